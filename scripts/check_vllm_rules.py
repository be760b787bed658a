#!/usr/bin/env python3
"""Check tests/vllm_rules.py (the encoding of vLLM 0.33.0's RoPE rules) against vLLM's own code, once,
outside CI, and write docs/vllm.md.

vLLM cannot serve on CPU-only machines, but its config handling and `get_rope` run there. For every
exported config of tests/unit/test_vllm_rules.py (and --max-model-len unset, = the declared context,
= the original window), this builds vLLM's `ModelConfig` (its config patching and default
max_model_len) and `get_rope` (the rotary embedding LLaMA would use), then reads back from the cos/sin
cache rows that forward() indexes: the attention scale (the row of position 0 is the scale itself)
and the effective inv_freq (the angle at a position where it has not wrapped). Both are compared with
the encoding and with pose_megatron.rope.compute_inv_freq.

    .venv/bin/python scripts/check_vllm_rules.py --vllm-python VENV/bin/python

VENV: a Python with the vllm 0.33.0 wheel (`pip download vllm==0.33.0 --no-deps`, installed with
--no-deps plus the few packages its import needs, torch 2.13 CPU and transformers 5.20). The vLLM
part runs as `--worker` under that interpreter with VLLM_TARGET_DEVICE=cpu.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(jobs_path: str) -> int:
    """Under the vLLM interpreter: vLLM's own max_model_len, scale and inv_freq per job."""
    import logging

    import torch
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import _ROPE_DICT, get_rope

    logging.disable(logging.WARNING)
    results = []
    for job in json.loads(Path(jobs_path).read_text()):
        config = json.loads((Path(job["dir"]) / "config.json").read_text())
        try:
            model_config = ModelConfig(model=job["dir"], tokenizer=job["dir"], skip_tokenizer_init=True,
                                       dtype="float32", max_model_len=job["user"])
        except Exception as error:  # noqa: BLE001 - vLLM's refusal is the result
            results.append({"error": f"{type(error).__name__}: {error}"[:300]})
            continue
        _ROPE_DICT.clear()
        with set_current_vllm_config(VllmConfig(model_config=model_config)):
            rope = get_rope(config["head_dim"], max_position=config["max_position_embeddings"],
                            rope_parameters=model_config.hf_config.rope_parameters, is_neox_style=True,
                            dtype=torch.float32)
        if hasattr(rope, "long_short_cos_sin_cache"):  # longrope: short rows, then long rows
            offset = rope.original_max_position_embeddings if rope.use_long_rope else 0
            rows = rope.max_position_embeddings if rope.use_long_rope else rope.original_max_position_embeddings
            cache = rope.long_short_cos_sin_cache[offset:offset + rows]
        else:
            cache = rope.cos_sin_cache
        cache = cache.double()  # [rows, d] = [cos | sin]
        cos, sin = cache.chunk(2, dim=-1)
        guess = torch.tensor(job["inv_freq"], dtype=torch.float64)  # only picks where to read
        position = torch.clamp((1.5 / guess).floor(), 1, cache.shape[0] - 1).long()
        index = torch.arange(len(guess))
        angle = torch.atan2(sin[position, index], cos[position, index])
        results.append({"class": type(rope).__name__, "max_model_len": model_config.max_model_len,
                        "cache_rows": int(cache.shape[0]), "scale": cos[0].tolist(),
                        "inv_freq": (angle / position).tolist(),
                        "rope_parameters": sorted(model_config.hf_config.rope_parameters)})
    print(json.dumps(results))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", required=True, help="interpreter with vllm 0.33.0 installed")
    parser.add_argument("--output", default=str(ROOT / "docs" / "vllm.md"))
    args = parser.parse_args(argv)
    sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "unit")]
    import numpy as np
    from test_vllm_rules import CASES, PROBES, declared_default_max_model_len, export_config, probe_config
    from vllm_rules import VLLM_VERSION, VllmRefuses, vllm_rope

    from pose_megatron.files import atomic_write_text
    from pose_megatron.rope import compute_inv_freq

    def encoded_or_refusal(config, user):
        """The encoding's answer, or its refusal (a refusal is a result to compare too)."""
        try:
            return vllm_rope(config, max_model_len=user)
        except VllmRefuses as refusal:
            return refusal

    work = Path(tempfile.mkdtemp(prefix="check_vllm_"))
    jobs, expected = [], []
    for name, (model, scaling, max_positions) in sorted(CASES.items()):
        config = export_config(model, scaling, max_positions)
        (work / name).mkdir()
        (work / name / "config.json").write_text(json.dumps(config))
        trained, factor = compute_inv_freq(scaling, model.head_dim, model.rotary_base)
        for user in (None, max_positions, scaling.original_max_position_embeddings or model.max_position_embeddings):
            encoded = encoded_or_refusal(config, user)
            jobs.append({"dir": str(work / name), "user": user, "inv_freq": trained.double().tolist()})
            expected.append((name, user, config, encoded, trained.double().numpy(), factor))
    for name in sorted(PROBES):  # configs one key away from an export: the rules where they bite
        config, user, _ = probe_config(name)
        directory = work / f"probe-{len(jobs)}"
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(config))
        encoded = encoded_or_refusal(config, user)
        jobs.append({"dir": str(directory), "user": user, "inv_freq": encoded.inv_freq.tolist()
                     if not isinstance(encoded, Exception) else [1.0] * (config["head_dim"] // 2)})
        expected.append((f"probe: {name}", user, config, encoded, None, None))
    (work / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}
    done = subprocess.run([args.vllm_python, __file__, "--worker", str(work / "jobs.json")],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"the vLLM worker failed:\n{done.stderr[-3000:]}")
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    version = subprocess.run([args.vllm_python, "-c", "import vllm, transformers; print(vllm.__version__, "
                              "transformers.__version__)"], capture_output=True, text=True, env=env).stdout.split()

    rows, failures = [], 0
    for (name, user, config, encoded, trained, factor), got in zip(expected, measured):
        if "error" in got or isinstance(encoded, Exception):
            agree = "error" in got and isinstance(encoded, Exception)
            said = got.get("error", "served").split(":")[0]
            rows.append(f"| {name} | {user or 'default'} | {said} | refused | - | - | - | "
                        f"{'agrees' if agree else 'DIFFERS'} |")
            failures += not agree
            continue
        inv = np.asarray(got["inv_freq"])
        scale = float(np.mean(got["scale"]))
        if trained is None:  # a probe: vLLM must do what the encoding says, trained or not
            agree = (got["max_model_len"] == encoded.max_model_len
                     and math.isclose(scale, encoded.attention_scale, rel_tol=1e-6))
            failures += not agree
            rows.append(f"| {name} | {user or 'default'} | {got['class']} | {got['max_model_len']} "
                        f"({got['cache_rows']} rows) | {scale:.6f} / - | - | - | "
                        f"{'agrees' if agree else 'DIFFERS'} |")
            continue
        vs_ours = float(np.max(np.abs(inv - trained) / trained))
        vs_encoded = float(np.max(np.abs(inv - encoded.inv_freq) / encoded.inv_freq))
        agree = (got["max_model_len"] == encoded.max_model_len and got["cache_rows"] == encoded.cache_rows
                 and math.isclose(scale, encoded.attention_scale, rel_tol=1e-6) and vs_encoded < 1e-5)
        trained_ok = math.isclose(scale, factor, rel_tol=1e-6) and vs_ours < 1e-5
        if user is None:
            trained_ok &= got["max_model_len"] == declared_default_max_model_len(config)
        failures += not (agree and trained_ok)
        rows.append(f"| {name} | {user or 'default'} | {got['class']} | {got['max_model_len']} "
                    f"({got['cache_rows']} rows) | {scale:.6f} / {factor:.6f} | {vs_ours:.1e} | "
                    f"{', '.join(got['rope_parameters'])} | "
                    f"{'agrees' if agree else 'DIFFERS'}{'' if trained_ok else ', NOT THE TRAINED ROPE'} |")
    atomic_write_text(args.output, markdown(rows, version, VLLM_VERSION, failures))
    print("\n".join(rows))
    print(f"{failures} failure(s); wrote {args.output}")
    return 1 if failures else 0


def markdown(rows, version, encoded_version, failures) -> str:
    vllm, transformers = (version + ["?", "?"])[:2]
    return "\n".join([
        "# vLLM: the encoded rules checked against vLLM's own code", "",
        f"Written by `scripts/check_vllm_rules.py` (outside CI): vLLM {vllm} (the wheel; CPU, "
        f"`VLLM_TARGET_DEVICE=cpu`) with transformers {transformers}, against the encoding of vLLM "
        f"{encoded_version} in `tests/vllm_rules.py` that `tests/unit/test_vllm_rules.py` applies in CI. "
        "For each exported config.json and --max-model-len (unset; the declared context; the original "
        "window): vLLM's `ModelConfig` gives max_model_len, `get_rope` the cos/sin cache that forward() "
        "indexes; its row at position 0 is the attention scale, and the angle where it has not wrapped "
        "gives the effective inv_freq.", "",
        "| export | --max-model-len | vLLM class | max_model_len (cache rows) | attention scale vLLM / "
        "trained | inv_freq max rel. diff from trained | RoPE keys vLLM saw | encoding |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
        f"{failures} disagreement(s). inv_freq is read from float32 cos/sin values, so differences up to "
        "about 1e-6 are the cache's rounding, not the rules. The `probe:` rows are configs one key away "
        "from an export (tests/unit/test_vllm_rules.py `PROBES`): where vLLM would not serve the trained "
        "RoPE, which is why the export writes what it writes; there the scale column shows vLLM's value "
        "only, and `refused` means vLLM raised at load time, as the encoding predicts.", "",
        "## Serving an export with vLLM", "",
        "- LLaMA exports of every rope type load as they are (`vllm serve EXPORT_DIR`); vLLM 0.33 has no "
        "Baichuan model (removed after 0.23), so Baichuan exports need transformers or llama.cpp.",
        "- linear: vLLM's default max_model_len is max_position_embeddings x factor, beyond the trained "
        "context; pass `--max-model-len` with the export's max_position_embeddings.",
        "- yarn-revised (exported as longrope): the export's `short_mscale` / `long_mscale` give vLLM the "
        "trained attention scale; any --max-model-len up to max_position_embeddings serves the same "
        "frequencies (short and long factors are equal).",
        "- default, ntk, yarn, llama3: the default max_model_len is max_position_embeddings.", ""])


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2]))
    sys.exit(main())
