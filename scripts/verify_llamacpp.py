#!/usr/bin/env python3
"""Check the llama.cpp export against a real llama.cpp, outside CI, and write docs/llamacpp.md.

For every rope type on LLaMA, and Baichuan2-7B's architecture (32 layers: llama.cpp applies
Baichuan's RoPE only at that depth), on tiny random models whose q/k weights are scaled up so that
RoPE visibly changes the logits:

    random HF model (the family's layout, the RoPE as an export writes it)
      -> convert_hf_to_megatron -> convert_megatron_to_hf (the project's export)
      -> the GGUF step of tools/export_gguf.py: plan, the llama.cpp converter, rewrite
      -> llama.cpp's logits vs transformers' logits for the same token ids (positions 0..299,
         beyond the 64-token original window)

Pass: max |logit difference| <= 1e-3 and the same argmax at every position. Control: the same GGUF
with another RoPE (plain RoPE; for the default type 8x linear interpolation) must differ by >= 0.1,
which shows the check would see a wrong RoPE. Types the GGUF step refuses are forced through anyway
to show why. "Converter alone" is the converter's GGUF without the rewrite. Where the current
converter fails (llama.cpp 0c1e570 on any Baichuan), the GGUF step runs on the early-2025
converter's GGUF (--old-llama-cpp), as a user would do.

    .venv/bin/python scripts/verify_llamacpp.py --llama-cpp SDIST/vendor/llama.cpp \
        --llama-python VENV/bin/python [--old-llama-cpp OLD_SDIST/vendor/llama.cpp]

(llama-cpp-python's PyPI sdist carries llama.cpp's source and its converter; VENV is where it is
built, see docs/llamacpp.md.) The logits come from scripts/llamacpp_logits.py under --llama-python.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pose_megatron.checkpoint.errors import ConversionError  # noqa: E402
from pose_megatron.checkpoint.gguf_export import CONVERTER, plan_gguf_export, rewrite_gguf, run_converter  # noqa: E402
from pose_megatron.checkpoint.gguf_rope import GGUFRope, gguf_rope_for  # noqa: E402
from pose_megatron.checkpoint.hf_arch import model_info_from_hf_config, read_hf_config  # noqa: E402
from pose_megatron.checkpoint.hf_export import convert_megatron_to_hf  # noqa: E402
from pose_megatron.checkpoint.hf_import import convert_hf_to_megatron  # noqa: E402
from pose_megatron.files import atomic_write_text  # noqa: E402
from pose_megatron.rope import RopeScaling  # noqa: E402
from tiny_gguf_models import FACTOR, WINDOW, build_model_dir, reference_model  # noqa: E402

N_TOKENS, N_CTX = 300, WINDOW * 8
PASS_MAX, CONTROL_MIN = 1e-3, 0.1
RIGHTLY_REFUSED = "refused, and rightly (the forced GGUF does not load or is wrong)"
CASES = [  # (family, case name, RoPE); Baichuan2 at default first, the rest of it last
    ("llama", "default", RopeScaling()),
    ("llama", "ntk", RopeScaling("ntk", FACTOR)),
    ("llama", "linear", RopeScaling("linear", FACTOR)),
    ("llama", "yarn", RopeScaling("yarn", FACTOR, WINDOW)),
    ("llama", "yarn, beta_fast 8 / beta_slow 2", RopeScaling("yarn", FACTOR, WINDOW, beta_fast=8.0, beta_slow=2.0)),
    ("llama", "yarn, attention_factor 1.5", RopeScaling("yarn", FACTOR, WINDOW, attention_factor=1.5)),
    ("llama", "yarn-revised", RopeScaling("yarn-revised", FACTOR, WINDOW)),
    ("llama", "llama3", RopeScaling("llama3", FACTOR, WINDOW)),
    ("baichuan2", "default", RopeScaling()),
    ("baichuan2", "yarn-revised", RopeScaling("yarn-revised", FACTOR, WINDOW)),
    ("baichuan2", "linear", RopeScaling("linear", FACTOR)),
    ("baichuan2", "ntk", RopeScaling("ntk", FACTOR)),
    ("baichuan2", "yarn", RopeScaling("yarn", FACTOR, WINDOW)),
    ("baichuan2", "llama3", RopeScaling("llama3", FACTOR, WINDOW)),
]


def control_rope(scaling: RopeScaling, base: float) -> GGUFRope:
    """Another RoPE llama.cpp could silently run: plain RoPE, or for plain RoPE 8x interpolation."""
    if scaling.rope_type == "default":
        return GGUFRope(freq_base=base, scaling_type="linear", factor=FACTOR)
    return GGUFRope(freq_base=base)


def compare(got, expected: np.ndarray) -> dict:
    if isinstance(got, str):  # llama.cpp did not load this GGUF
        return {"max": float("inf"), "mean": float("inf"), "argmax": 0.0, "error": got}
    diff = np.abs(got.astype(np.float64) - expected)
    return {"max": float(diff.max()), "mean": float(diff.mean()),
            "argmax": float((got.argmax(-1) == expected.argmax(-1)).mean())}


def prepare_case(family, name, scaling, work: Path, args, tokens):
    """Build, export and convert one case; returns its record and the GGUFs to evaluate."""
    base = build_model_dir(family, scaling, work / "base", args.tokenizer)
    convert_hf_to_megatron(base, work / "megatron")
    export = convert_megatron_to_hf(work / "megatron", work / "export", tokenizer_dir=base)
    with torch.no_grad():
        ids = torch.tensor([tokens])
        model = reference_model(family, export)
        reference = model(ids, attention_mask=torch.ones_like(ids)).logits[0].double().numpy()
    record = {"family": family, "case": name, "rope": scaling.rope_type,
              "max_abs_logit": float(np.abs(reference).max()),
              "config_rope": json.loads((export / "config.json").read_text())["rope_parameters"]}
    ggufs = {}
    try:
        plan = plan_gguf_export(export, "f32")
        record["refused"] = None
    except ConversionError as refusal:
        plan, record["refused"] = None, str(refusal)
    model_cfg = model_info_from_hf_config(read_hf_config(export)).model
    rope = plan.rope if plan else gguf_rope_for(scaling, model_cfg.rotary_base, model_cfg.head_dim)
    normalise = family == "baichuan2"
    converted = {}  # converter label -> its GGUF, for each converter that succeeded
    for label, source in (("converter", args.llama_cpp), ("old converter", args.old_llama_cpp)):
        if source is None:
            continue
        out = work / f"{label.replace(' ', '-')}.gguf"
        try:
            run_converter(Path(source) / CONVERTER, export, out, "f32", args.converter_python, quiet=True)
        except ConversionError as failure:  # its last line names the converter's error
            record[f"{label}_error"] = str(failure).strip().splitlines()[-1]
            continue
        converted[label] = ggufs[f"{label} alone"] = out
        if label == "old converter" and plan:
            ggufs["old + gguf step"] = work / "old-gguf-step.gguf"
            rewrite_gguf(out, ggufs["old + gguf step"], plan.rope, normalise_output=normalise)
    if not converted:
        raise RuntimeError(f"{family} {name}: no llama.cpp converter converted the export: {record}")
    # The GGUF step on the current converter's GGUF, else (where that converter fails) the old one's.
    record["step_input"] = next(iter(converted))
    final = work / ("gguf-step.gguf" if plan else "forced.gguf")
    record["changes"] = rewrite_gguf(converted[record["step_input"]], final, rope, normalise_output=normalise)
    ggufs["gguf step" if plan else "forced"] = final
    ggufs["control"] = work / "control.gguf"
    rewrite_gguf(final, ggufs["control"], control_rope(scaling, model_cfg.rotary_base))
    return record, reference, ggufs


def evaluate(ggufs: dict, tokens, work: Path, args) -> tuple:
    """Every GGUF through llama.cpp in one worker process: {key: logits}, llama-cpp-python version."""
    jobs = [{"gguf": str(path), "out": str(work / f"logits-{i}.npy")} for i, path in enumerate(ggufs.values())]
    spec = work / "jobs.json"
    spec.write_text(json.dumps({"tokens": tokens, "n_ctx": N_CTX, "threads": args.threads, "jobs": jobs}))
    done = subprocess.run([args.llama_python, str(ROOT / "scripts" / "llamacpp_logits.py"), str(spec)],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"llama.cpp worker failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    failures = report["failures"]
    return ({key: failures.get(job["out"]) or np.load(job["out"]) for key, job in zip(ggufs, jobs)},
            report["llama_cpp_python"])


def check_cli_matches(args, work: Path, expected: Path) -> str:
    """tools/export_gguf.py end to end on one export: its GGUF must equal the pieces' byte for byte."""
    out = work / "cli.gguf"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "export_gguf.py"), "--hf-dir",
                           str(work / "export"), "--llama-cpp", args.llama_cpp, "--outfile", str(out),
                           "--outtype", "f32", "--converter-python", args.converter_python],
                          capture_output=True, text=True)
    if done.returncode:
        return f"tools/export_gguf.py failed: {done.stderr.strip().splitlines()[-1]}"
    same = out.read_bytes() == expected.read_bytes()
    return f"tools/export_gguf.py wrote the same GGUF byte for byte: {same}"


def verdict(record: dict) -> str:
    result = record["results"]
    main = result.get("gguf step") or result.get("forced")
    control_ok = result["control"]["max"] >= CONTROL_MIN
    exact = main["max"] <= PASS_MAX and main["argmax"] == 1.0
    if record["refused"]:
        return RIGHTLY_REFUSED if not exact else "REFUSED BUT WOULD WORK"
    if exact and control_ok:
        return "pass"
    return "FAIL" if not exact else "CONTROL TOO WEAK"


def cell(result: dict) -> str:
    if result and "error" in result:
        return "llama.cpp refused to load it"
    return f"{result['max']:.2g} ({100 * result['argmax']:.0f}%)" if result else "-"


def markdown(records, version, args, cli_note, planned) -> str:
    unfinished = (f"**Incomplete: {len(records)} of {planned} cases measured** (the run was stopped; "
                  "the rest are not verified).\n\n" if len(records) < planned else "")
    lines = [
        "# llama.cpp: measured", "",
        unfinished + "Written by `scripts/verify_llamacpp.py` (outside CI) against a real llama.cpp built on CPU: "
        f"llama-cpp-python {version}, converter `{Path(args.llama_cpp).name}/{CONVERTER}` from the same "
        f"source{' (' + args.label + ')' if args.label else ''}"
        + (f"; early-2025 converter: {args.old_label}" if args.old_llama_cpp else "") + ".", "",
        f"Tiny random models (hidden 64, 4 heads of 16, q/k weights scaled up; LLaMA 2 layers with 2 "
        f"KV groups, Baichuan2 32 layers with NormHead, the layers after the second writing 1/20 as much into the residual stream so that float32 rounding stays small), RoPE base 10000, window {WINDOW}, factor "
        f"{FACTOR:g}, max_position_embeddings {N_CTX}; {N_TOKENS} token ids at positions 0..{N_TOKENS - 1}; "
        f"float32 GGUF and KV cache; the reference logits reach |{max(r['max_abs_logit'] for r in records):.1f}|. "
        "Each cell: max |logit difference| from transformers (share of "
        f"positions with the same argmax). Pass: <= {PASS_MAX:g} with every argmax equal; the control "
        f"(the same GGUF with plain RoPE, or 8x linear for the default type) must differ by >= {CONTROL_MIN:g}.",
        "", "| model | rope type | converter alone | + GGUF step (tools/export_gguf.py) | control | result |",
        "|---|---|---|---|---|---|"]
    for r in records:
        res = r["results"]
        step = cell(res.get("gguf step")) if not r["refused"] else f"refused; forced: {cell(res['forced'])}"
        alone = cell(res["converter alone"]) if "converter alone" in res else \
            f"converter failed ({r['converter_error']}); step on the old converter's GGUF"
        lines.append(f"| {r['family']} | {r['case']} | {alone} | {step} | "
                     f"{cell(res['control'])} | {verdict(r)} |")
    if args.old_llama_cpp:
        lines += ["", f"Early-2025 converter ({args.old_label}) on the same exports, run by the "
                  "runtime above:", "",
                  "| model | rope type | old converter alone | old converter + GGUF step |", "|---|---|---|---|"]
        for r in records:
            res = r["results"]
            if "old converter alone" in res or "old converter_error" in r:
                alone = cell(res.get("old converter alone")) if "old converter alone" in res else \
                    f"failed: {r['old converter_error']}"
                lines.append(f"| {r['family']} | {r['case']} | {alone} | {cell(res.get('old + gguf step'))} |")
    lines += ["", "What the GGUF step changed in the converter's GGUF, and what it refused:", ""]
    for r in records:
        what = r["refused"] or ("; ".join(r["changes"]) or "nothing (the converter's GGUF was right)")
        lines.append(f"- {r['family']} {r['case']}: {what}")
    lines += ["", cli_note, "", "Rerun: see the docstring of scripts/verify_llamacpp.py; building "
              "llama-cpp-python from its sdist on 2 CPU cores takes about an hour "
              "(`CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF\" "
              "pip install --no-binary :all: llama-cpp-python`).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", required=True, help="llama.cpp source holding convert_hf_to_gguf.py")
    parser.add_argument("--llama-python", default=sys.executable, help="interpreter with llama_cpp")
    parser.add_argument("--converter-python", default=sys.executable, help="interpreter for the converter")
    parser.add_argument("--old-llama-cpp", default=None, help="an early-2025 llama.cpp source (converter only)")
    parser.add_argument("--label", default="", help="version note for the docs (e.g. the llama.cpp commit)")
    parser.add_argument("--old-label", default="an early-2025 llama.cpp",
                        help="version note for --old-llama-cpp in the docs")
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--output", default=str(ROOT / "docs" / "llamacpp.md"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=None, help="run only cases whose 'family case' contains this")
    parser.add_argument("--reuse", action="store_true",
                        help="take the cases an earlier run with the same --work finished from its record.json")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="verify_llamacpp_"))
    work.mkdir(parents=True, exist_ok=True)
    args.tokenizer = work / "tokenizer.model"
    from tiny_gguf_models import VOCAB, train_tokenizer

    train_tokenizer(args.tokenizer)
    tokens = [1] + np.random.default_rng(0).integers(3, VOCAB, N_TOKENS - 1).tolist()
    records, version, cli_note = [], "?", "tools/export_gguf.py was not run"
    selected = [case for case in CASES if not args.only or args.only in f"{case[0]} {case[1]}"]
    for family, name, scaling in selected:
        case_dir = work / f"{family}-{name}".replace(" ", "").replace(",", "-").replace("/", "-")
        case_dir.mkdir(parents=True, exist_ok=True)
        saved = case_dir / "record.json"
        if args.reuse and saved.is_file():  # a case an earlier run with this --work finished
            record = json.loads(saved.read_text())
            records.append(record)
            version, cli_note = record.get("llama_cpp_python", version), record.get("cli_note", cli_note)
            continue
        shutil.rmtree(case_dir)  # an unfinished earlier attempt
        case_dir.mkdir()
        record, reference, ggufs = prepare_case(family, name, scaling, case_dir, args, tokens)
        logits, version = evaluate(ggufs, tokens, case_dir, args)
        record["results"] = {key: compare(value, reference) for key, value in logits.items()}
        record["llama_cpp_python"] = version
        if family == "llama" and scaling.rope_type == "yarn-revised":
            cli_note = record["cli_note"] = check_cli_matches(args, case_dir, ggufs["gguf step"])
        atomic_write_text(saved, json.dumps(record, indent=1))  # --reuse reads it back
        records.append(record)
        print(f"{family} {name}: {verdict(record)} "
              + json.dumps({k: round(v["max"], 7) for k, v in record["results"].items()}), flush=True)
        # after every case, so that a run stopped early still documents what it measured
        atomic_write_text(args.output, markdown(records, version, args, cli_note, len(selected)))
    atomic_write_text(work / "results.json", json.dumps(records, indent=1))
    atomic_write_text(args.output, markdown(records, version, args, cli_note, len(selected)))
    print(f"wrote {args.output} (details: {work / 'results.json'})")
    bad = [r for r in records if verdict(r) not in ("pass", RIGHTLY_REFUSED)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
