"""A small end-to-end reproduction of the PoSE paper's comparison (its Table 1) on CPU.

    python -m experiments.pose_small.reproduce --out outputs/reproduce            # the full run (~1 h, 2 cores)
    python -m experiments.pose_small.reproduce --quick --out /tmp/reproduce_quick # every stage, < 3 min

Stages (each writes its outputs under --out and is skipped when they exist; --force redoes all):
1. data      the sample corpus, synthetic passkey-style retrieval documents (synthetic.py)
             for pretraining (window-long) and extension (target-long), a held-out copy of each, and
             held-out corpus documents cut to a fixed length; all tokenized by tools/preprocess_data.py
2. pretrain  a small LLaMA at the short window on corpus + short retrieval documents (50/50 blend)
3. extend    six extensions from the pretrained weights (--finetune), same steps, schedule and tokens
             per step, on corpus + long retrieval documents: PoSE with linear / NTK / revised YaRN,
             full-length training, PI-only and RandPos
4. evaluate  tools/eval_perplexity.py, tools/eval_passkey.py and tools/eval_far_tokens.py on the
             base and every extended model
5. report    summary.json, tables (report.md) and the figure (results.png); --docs-dir copies them
Every training and evaluation step is a subprocess of the project's own tools (2 gloo processes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Settings:
    """One scale of the experiment (full or quick)."""

    model: str
    seq_length: int  # L_c: the pretraining window
    target_length: int  # L_t
    pretrain_iters: int
    pretrain_batch: int  # samples of seq_length per step
    pretrain_lr: float
    pretrain_warmup: int
    extend_iters: int
    extend_batch: int  # samples of seq_length per step; full-length uses the same tokens per step
    extend_lr: float
    extend_warmup: int
    synth_pretrain_docs: int
    synth_extend_docs: int
    eval_docs: int
    ppl_lengths: List[int]
    ppl_stride: int
    passkey_lengths: List[int]
    passkey_trials: int
    far_docs: int
    far_stride: int
    methods: List[str]
    eval_interval: int = 50
    eval_iters: int = 8
    seed: int = 1234
    nproc: int = 2
    pretrain_more_iters: int = 0  # a second pretraining stage (fresh schedule); 0 skips it
    pretrain_more_lr: float = 5e-4
    pretrain_more_seed: int = 99

    @property
    def factor(self) -> int:
        return self.target_length // self.seq_length

    @property
    def tokens_per_step(self) -> int:
        return self.extend_batch * self.seq_length


ALL_METHODS = ["pose-linear", "pose-ntk", "pose-yarn-revised", "full-length", "pi-only", "randpos"]

FULL = Settings(
    model="small", seq_length=256, target_length=2048,
    pretrain_iters=500, pretrain_batch=16, pretrain_lr=1e-3, pretrain_warmup=30,
    extend_iters=120, extend_batch=16, extend_lr=3e-4, extend_warmup=10,
    synth_pretrain_docs=8000, synth_extend_docs=1500,
    eval_docs=24, ppl_lengths=[256, 512, 1024, 2048], ppl_stride=128,
    passkey_lengths=[256, 512, 1024, 2048], passkey_trials=20,
    far_docs=16, far_stride=64, methods=list(ALL_METHODS),
    # 500 steps learn the corpus but not yet to copy the key (passkey 0/20 at 256); 300 more
    # steps on the same mixture reach 30/30 at 256 (an induction-like jump).
    pretrain_more_iters=300,
)

QUICK = Settings(
    model="tiny", seq_length=128, target_length=512,
    pretrain_iters=6, pretrain_batch=4, pretrain_lr=1e-3, pretrain_warmup=1,
    extend_iters=3, extend_batch=8, extend_lr=3e-4, extend_warmup=1,
    synth_pretrain_docs=64, synth_extend_docs=32,
    eval_docs=2, ppl_lengths=[128, 256, 512], ppl_stride=64,
    passkey_lengths=[128, 512], passkey_trials=1,
    far_docs=2, far_stride=64, methods=["pose-yarn-revised", "full-length"],
    eval_interval=3, eval_iters=1,
)


def method_flags(method: str, s: Settings) -> List[str]:
    """Training flags of one extension method (beyond the shared ones)."""
    lc, lt, factor = s.seq_length, s.target_length, str(s.factor)
    pose = ["--seq-length", str(lc), "--pose-target-length", str(lt), "--pose-content", "skip",
            "--micro-batch-size", str(s.extend_batch // s.nproc), "--global-batch-size", str(s.extend_batch)]
    if method == "pose-linear":
        return pose + ["--rope-type", "linear"]
    if method == "pose-ntk":
        return pose + ["--rope-type", "ntk"]
    if method == "pose-yarn-revised":
        return pose + ["--rope-type", "yarn-revised", "--rope-original-max-position-embeddings", str(lc)]
    if method == "randpos":
        return pose + ["--rope-type", "linear", "--pose-num-chunks", str(lc)]
    if method == "full-length":
        batch = s.tokens_per_step // lt
        if batch < s.nproc or batch % s.nproc:
            raise ValueError(f"full-length needs a global batch divisible by {s.nproc}, got {batch}")
        return ["--seq-length", str(lt), "--pose-target-length", str(lt), "--pose-content", "contiguous",
                "--pose-content-window", str(lt), "--rope-type", "linear", "--rope-factor", factor,
                "--micro-batch-size", str(batch // s.nproc), "--global-batch-size", str(batch)]
    if method == "pi-only":
        return ["--seq-length", str(lc), "--pose-target-length", str(lc), "--pose-content", "contiguous",
                "--pose-content-window", str(lc), "--rope-type", "linear", "--rope-factor", factor,
                "--micro-batch-size", str(s.extend_batch // s.nproc), "--global-batch-size", str(s.extend_batch)]
    raise ValueError(f"unknown method {method!r}; choose from {ALL_METHODS}")


# ---- running the project's tools ---------------------------------------------------------------

def _log(message: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_tool(args: List[str], log_file: Path, distributed: bool, nproc: int) -> dict:
    """Run a tool (torchrun with `nproc` processes when distributed); returns wall and CPU seconds.
    The output goes to log_file; a failure raises with the log's tail."""
    command = [sys.executable]
    if distributed:
        command += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    command += args
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(log_file, "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        tail = "".join(open(log_file).readlines()[-30:])
        raise RuntimeError(f"{' '.join(args[:3])} failed ({code}); see {log_file}:\n{tail}")
    return {"wall_seconds": wall,
            "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


_ITER_LINE = re.compile(r"iteration\s+(\d+)/\d+ \| lm loss ([\d.]+).*?\| (\d+) ms/it \| ([\d,]+) tokens/s"
                        r".*?peak mem ([\d.]+) GiB")
_VALID_LINE = re.compile(r"validation at iteration (\d+) \| lm loss ([\d.]+) \| ppl ([\d.]+)")


def parse_training_log(path: Path) -> dict:
    """Throughput and memory from the trainer's log lines (the first step, which includes warm-up,
    is left out of the throughput when later ones exist)."""
    steps, valid = [], []
    for line in open(path, errors="replace"):
        m = _ITER_LINE.search(line)
        if m:
            steps.append({"iteration": int(m.group(1)), "loss": float(m.group(2)), "ms_per_it": int(m.group(3)),
                          "tokens_per_s": float(m.group(4).replace(",", "")), "peak_mem_gib": float(m.group(5))})
        m = _VALID_LINE.search(line)
        if m:
            valid.append({"iteration": int(m.group(1)), "loss": float(m.group(2)), "ppl": float(m.group(3))})
    timed = [s for s in steps if s["iteration"] > 1] or steps
    return {
        "tokens_per_s": statistics.median(s["tokens_per_s"] for s in timed) if timed else None,
        "ms_per_it": statistics.median(s["ms_per_it"] for s in timed) if timed else None,
        "peak_mem_gib": max((s["peak_mem_gib"] for s in steps), default=None),
        "final_loss": steps[-1]["loss"] if steps else None,
        "validation": valid,
    }


# ---- stages ------------------------------------------------------------------------------------

class Reproduction:
    def __init__(self, settings: Settings, out: Path, force: bool = False):
        self.s = settings
        self.out = out
        self.force = force
        for sub in ("data", "checkpoints", "logs", "eval"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        self.state_file = out / "state.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.exists() and not force else {}

    def _save_state(self) -> None:
        self.state_file.write_text(json.dumps(self.state, indent=2))

    def _done(self, key: str, *paths: Path) -> bool:
        return not self.force and key in self.state and all(p.exists() for p in paths)

    def _train(self, flags: List[str], log: Path) -> dict:
        return run_tool(["-m", "pose_megatron.train"] + flags, log, True, self.s.nproc)

    # 1 ------------------------------------------------------------------------------------------
    def data(self) -> dict:
        if self._done("data", self.out / "data" / "manifest.json"):
            return self.state["data"]
        from experiments.pose_small import synthetic
        from pose_megatron.corpus import ensure_sample_corpus
        from pose_megatron.tokenizer import build_tokenizer

        s, data_dir = self.s, self.out / "data"
        corpus = ensure_sample_corpus()
        tokenizer = build_tokenizer(corpus.tokenizer_type, corpus.tokenizer_model)
        tpw = synthetic.filler_tokens_per_word(tokenizer)
        specs = {
            "synth_pretrain": (synthetic.pretraining_spec(s.seq_length, tpw), s.synth_pretrain_docs, 1),
            "synth_extend": (synthetic.extension_spec(s.target_length, tpw), s.synth_extend_docs, 2),
            "synth_extend_valid": (synthetic.extension_spec(s.target_length, tpw), max(s.far_docs, 8), 102),
        }
        manifest = {"tokenizer_model": corpus.tokenizer_model, "corpus_train": corpus.train_prefix,
                    "corpus_valid": corpus.valid_prefix, "filler_tokens_per_word": tpw, "synthetic": {}}
        jsonls = {}
        for name, (spec, count, seed) in specs.items():
            jsonls[name] = data_dir / f"{name}.jsonl"
            synthetic.write_retrieval_jsonl(str(jsonls[name]), spec, count, seed)
            manifest["synthetic"][name] = {**synthetic.describe(spec, tokenizer, sample=20, seed=seed),
                                           "documents": count, "seed": seed}
        jsonls["eval_corpus"] = data_dir / "eval_corpus.jsonl"
        manifest["eval_corpus_documents"] = write_eval_documents(
            corpus.valid_jsonl, jsonls["eval_corpus"], tokenizer, s.target_length + s.target_length // 16,
            s.eval_docs)
        # The tokenizer runs are independent: run them side by side.
        with ThreadPoolExecutor(max_workers=len(jsonls)) as pool:
            prefixes = dict(zip(jsonls, pool.map(lambda j: self._preprocess(j, corpus.tokenizer_model),
                                                 jsonls.values())))
        manifest.update(prefixes)
        (data_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
        self.state["data"] = manifest
        self._save_state()
        return manifest

    def _preprocess(self, jsonl: Path, tokenizer_model: str) -> str:
        prefix = jsonl.with_suffix("")
        run_tool([str(ROOT / "tools" / "preprocess_data.py"), "--input", str(jsonl), "--output-prefix",
                  str(prefix), "--tokenizer-type", "sentencepiece", "--tokenizer-model", tokenizer_model,
                  "--append-eod", "--prepend-bos", "--workers", "1", "--no-progress"],
                 self.out / "logs" / f"preprocess_{jsonl.stem}.log", False, 1)
        return f"{prefix}_text_document"

    # 2 ------------------------------------------------------------------------------------------
    def pretrain(self) -> dict:
        ckpt = self.out / "checkpoints" / "base"
        if self._done("pretrain", ckpt / "latest_checkpointed_iteration.txt"):
            return self.state["pretrain"]
        s, d = self.s, self.state["data"]
        log = self.out / "logs" / "pretrain.log"
        _log(f"pretraining {s.model} at {s.seq_length} for {s.pretrain_iters} steps")
        shutil.rmtree(ckpt, ignore_errors=True)
        cost = self._train([
            "--model", s.model, "--seq-length", str(s.seq_length), "--pose-content", "contiguous",
            "--pose-content-window", str(s.seq_length), "--rope-type", "default",
            "--micro-batch-size", str(s.pretrain_batch // s.nproc), "--global-batch-size", str(s.pretrain_batch),
            "--train-iters", str(s.pretrain_iters), "--lr", str(s.pretrain_lr), "--min-lr", str(s.pretrain_lr / 10),
            "--lr-warmup-iters", str(s.pretrain_warmup), "--lr-decay-style", "cosine",
            "--data-path", "0.5", d["corpus_train"], "0.5", d["synth_pretrain"],
            "--tokenizer-model", d["tokenizer_model"], "--split", "98,2,0",
            "--eval-interval", str(s.eval_interval), "--eval-iters", str(s.eval_iters),
            "--log-interval", str(max(1, s.eval_interval // 2)), "--precision", "fp32", "--seed", str(s.seed),
            "--save", str(ckpt), "--metrics-file", str(self.out / "logs" / "pretrain_metrics.jsonl"),
            "--data-cache-path", str(self.out / "data" / "index_cache"),
        ], log)
        self.state["pretrain"] = {**cost, **parse_training_log(log), "checkpoint": str(ckpt)}
        self._save_state()
        return self.state["pretrain"]

    def pretrain_more(self) -> dict:
        """Continue pretraining from `base` on the same mixture with a fresh schedule."""
        ckpt = self.out / "checkpoints" / "pretrained"
        if self._done("pretrain_more", ckpt / "latest_checkpointed_iteration.txt"):
            return self.state["pretrain_more"]
        s, d = self.s, self.state["data"]
        log = self.out / "logs" / "pretrain_more.log"
        _log(f"continuing pretraining for {s.pretrain_more_iters} steps")
        shutil.rmtree(ckpt, ignore_errors=True)
        cost = self._train([
            "--model", s.model, "--seq-length", str(s.seq_length), "--pose-content", "contiguous",
            "--pose-content-window", str(s.seq_length), "--rope-type", "default",
            "--micro-batch-size", str(s.pretrain_batch // s.nproc), "--global-batch-size", str(s.pretrain_batch),
            "--train-iters", str(s.pretrain_more_iters), "--lr", str(s.pretrain_more_lr),
            "--min-lr", str(s.pretrain_more_lr / 10), "--lr-warmup-iters", "10", "--lr-decay-style", "cosine",
            "--data-path", "0.5", d["corpus_train"], "0.5", d["synth_pretrain"],
            "--tokenizer-model", d["tokenizer_model"], "--split", "100,0,0", "--eval-iters", "0",
            "--log-interval", "25", "--precision", "fp32", "--seed", str(s.pretrain_more_seed),
            "--load", str(self.out / "checkpoints" / "base"), "--finetune", "--save", str(ckpt),
            "--data-cache-path", str(self.out / "data" / "index_cache"),
        ], log)
        self.state["pretrain_more"] = {**cost, **parse_training_log(log), "checkpoint": str(ckpt)}
        self._save_state()
        return self.state["pretrain_more"]

    @property
    def pretrained(self) -> Path:
        """The checkpoint every extension starts from (and the table's base model)."""
        name = "pretrained" if self.s.pretrain_more_iters else "base"
        return self.out / "checkpoints" / name

    # 3 ------------------------------------------------------------------------------------------
    def extend(self, method: str) -> dict:
        ckpt = self.out / "checkpoints" / method
        key = f"extend/{method}"
        if self._done(key, ckpt / "latest_checkpointed_iteration.txt"):
            return self.state[key]
        s, d = self.s, self.state["data"]
        log = self.out / "logs" / f"extend_{method}.log"
        _log(f"extending with {method}: {s.extend_iters} steps of {s.tokens_per_step} tokens")
        shutil.rmtree(ckpt, ignore_errors=True)
        cost = self._train(method_flags(method, s) + [
            "--model", s.model, "--load", str(self.pretrained), "--finetune",
            "--train-iters", str(s.extend_iters), "--lr", str(s.extend_lr), "--min-lr", "0",
            "--lr-warmup-iters", str(s.extend_warmup), "--lr-decay-style", "linear",
            "--data-path", "0.5", d["corpus_train"], "0.5", d["synth_extend"],
            "--tokenizer-model", d["tokenizer_model"], "--split", "100,0,0", "--eval-iters", "0",
            "--log-interval", str(max(1, s.extend_iters // 10)), "--precision", "fp32", "--seed", str(s.seed),
            "--save", str(ckpt), "--metrics-file", str(self.out / "logs" / f"extend_{method}_metrics.jsonl"),
            "--data-cache-path", str(self.out / "data" / "index_cache"),
        ], log)
        self.state[key] = {**cost, **parse_training_log(log), "checkpoint": str(ckpt),
                           "tokens_per_step": s.tokens_per_step, "steps": s.extend_iters}
        self._save_state()
        return self.state[key]

    # 4 ------------------------------------------------------------------------------------------
    def checkpoints(self) -> List[List[str]]:
        pairs = [["base", str(self.pretrained)]]
        pairs += [[m, str(self.out / "checkpoints" / m)] for m in self.s.methods]
        return pairs

    def _load_flags(self) -> List[str]:
        flags = []
        for label, path in self.checkpoints():
            flags += ["--load", path, "--label", label]
        return flags

    def evaluate(self) -> dict:
        s, d = self.s, self.state["data"]
        ev = self.out / "eval"
        labels = [label for label, _ in self.checkpoints()]
        common = self._load_flags() + ["--tokenizer-model", d["tokenizer_model"], "--no-progress"]
        jobs = {
            "perplexity": [str(ROOT / "tools" / "eval_perplexity.py"), "--data-path", d["eval_corpus"],
                           "--lengths", ",".join(map(str, s.ppl_lengths)), "--stride", str(s.ppl_stride),
                           "--num-docs", str(s.eval_docs), "--min-doc-tokens", str(s.target_length)],
            "passkey": [str(ROOT / "tools" / "eval_passkey.py"), "--lengths", ",".join(map(str, s.passkey_lengths)),
                        "--trials", str(s.passkey_trials), "--max-new-tokens", "7", "--seed", "0"],
        }
        far = [str(ROOT / "tools" / "eval_far_tokens.py"), "--far-start", str(s.target_length // 2), "--far-end", str(s.target_length),
               "--short-window", str(s.seq_length), "--stride", str(s.far_stride), "--num-docs", str(s.far_docs)]
        jobs["far_tokens"] = far + ["--data-path", d["eval_corpus"], d["synth_extend_valid"],
                                    "--data-name", "corpus", "synthetic"]
        for name, args in jobs.items():
            output = ev / f"{name}.json"
            key = f"eval/{name}"
            if self._done(key, output) and self.state[key].get("labels") == labels:
                continue
            _log(f"evaluating {name} of {len(labels)} checkpoints")
            cost = run_tool(args + common + ["--output", str(output)],
                            self.out / "logs" / f"eval_{name}.log", True, s.nproc)
            self.state[key] = {**cost, "labels": labels, "output": str(output)}
            self._save_state()
        return {name: json.loads((ev / f"{name}.json").read_text()) for name in jobs}

    # 5 ------------------------------------------------------------------------------------------
    def report(self, results: dict, docs_dir: Optional[Path]) -> dict:
        summary = build_summary(self, results)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        (self.out / "report.md").write_text(render_markdown(summary))
        plot_summary(summary, self.out / "results.png")
        if docs_dir is not None:
            docs_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.out / "summary.json", docs_dir / "results_summary.json")
            shutil.copy(self.out / "report.md", docs_dir / "results_tables.md")
            shutil.copy(self.out / "results.png", docs_dir / "results.png")
            for name in ("perplexity", "passkey"):
                png = self.out / "eval" / f"{name}.png"
                if png.exists():
                    shutil.copy(png, docs_dir / f"results_{name}.png")
        return summary

    def run(self, docs_dir: Optional[Path] = None) -> dict:
        started = time.perf_counter()
        self.data()
        self.pretrain()
        if self.s.pretrain_more_iters:
            self.pretrain_more()
        for method in self.s.methods:
            self.extend(method)
        results = self.evaluate()
        summary = self.report(results, docs_dir)
        _log(f"done in {time.perf_counter() - started:.0f} s (this invocation); outputs in {self.out}")
        return summary


def write_eval_documents(valid_jsonl: str, output: Path, tokenizer, num_tokens: int, num_docs: int) -> int:
    """Held-out corpus documents cut to about `num_tokens` tokens (so every window length scores
    the same tokens and evaluation time is bounded); documents shorter than that are skipped."""
    kept = 0
    with open(valid_jsonl) as source, open(output, "w") as out:
        for line in source:
            text = json.loads(line)["text"]
            ids = tokenizer.tokenize(text)
            if len(ids) < num_tokens + 16:
                continue
            cut = tokenizer.detokenize(ids[:num_tokens])
            out.write(json.dumps({"text": cut}) + "\n")
            kept += 1
            if kept >= num_docs:
                break
    if kept == 0:
        raise ValueError(f"no held-out document has {num_tokens} tokens")
    return kept


# ---- report ------------------------------------------------------------------------------------

LABELS = {"base": "No fine-tuning (base)", "pose-linear": "PoSE-Linear", "pose-ntk": "PoSE-NTK",
          "pose-yarn-revised": "PoSE-YaRN (revised)", "full-length": "Full-length", "pi-only": "PI-only",
          "randpos": "RandPos"}


def build_summary(repro: "Reproduction", results: dict) -> dict:
    """Everything the tables and the figure show, in one JSON-able dict."""
    s, state = repro.s, repro.state
    ppl, passkey = results["perplexity"]["results"], results["passkey"]["results"]
    models = {}
    for label, _ in repro.checkpoints():
        entry = {
            "perplexity": {str(n): ppl[label][str(n)]["perplexity"] for n in s.ppl_lengths},
            "passkey": {str(n): passkey[label]["by_length"][str(n)]["accuracy"] for n in s.passkey_lengths},
            "far_corpus": _far(results["far_tokens"]["results"]["corpus"][label]),
            "far_synthetic": _far(results["far_tokens"]["results"]["synthetic"][label]),
        }
        if label != "base":
            run = state[f"extend/{label}"]
            entry["cost"] = {k: run.get(k) for k in ("wall_seconds", "cpu_seconds", "tokens_per_s", "ms_per_it",
                                                     "peak_mem_gib", "final_loss", "tokens_per_step", "steps")}
        models[label] = entry
    return {
        "settings": dataclasses.asdict(s),
        "pretrain": {k: state["pretrain"].get(k) for k in ("wall_seconds", "cpu_seconds", "tokens_per_s",
                                                           "peak_mem_gib", "final_loss", "validation")},
        "pretrain_more": {k: state.get("pretrain_more", {}).get(k) for k in ("wall_seconds", "cpu_seconds",
                                                                             "tokens_per_s", "final_loss")},
        "models": models,
        "eval_cost": {k.split("/")[1]: v for k, v in state.items() if k.startswith("eval/")},
        "data": {k: v for k, v in state["data"].items() if k in ("synthetic", "eval_corpus_documents",
                                                              "filler_tokens_per_word")},
        "far_protocol": results["far_tokens"]["protocol"],
        "ppl_data": results["perplexity"]["data"],
    }


def _far(r: dict) -> dict:
    return {"full": r["full_perplexity"], "short": r["short_perplexity"], "ratio": r["ratio"],
            "tokens": r["tokens_scored"]}


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ppl(value: Optional[float]) -> str:
    """Perplexities as in the paper's table: beyond 1000 is just >1000."""
    return ">1000" if value is not None and value > 1000 else _fmt(value)


def render_markdown(summary: dict) -> str:
    s, models = summary["settings"], summary["models"]
    far = summary["far_protocol"]
    lines = [f"Main results ({s['model']} model, {s['seq_length']} -> {s['target_length']}, seed {s['seed']}; "
             f"perplexity on held-out corpus documents, stride {s['ppl_stride']}; passkey accuracy over "
             f"{s['passkey_trials']} trials per length; far tokens = positions {far['start']}..{far['end'] - 1} "
             f"scored with full context vs a {far['short_window']}-token window):", ""]
    ppl_cols = [f"PPL {n}" for n in s["ppl_lengths"]]
    pk_cols = [f"passkey {n}" for n in s["passkey_lengths"]]
    header = ["Model", "train / target"] + ppl_cols + pk_cols + ["far full / short (corpus)",
                                                               "far full / short (synthetic)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, m in models.items():
        span = {"base": f"{s['seq_length']} / {s['seq_length']}",
                "full-length": f"{s['target_length']} / {s['target_length']}",
                "pi-only": f"{s['seq_length']} / {s['seq_length']} (x{s['target_length'] // s['seq_length']})"}
        row = [LABELS.get(label, label), span.get(label, f"{s['seq_length']} / {s['target_length']}")]
        row += [_ppl(m["perplexity"][str(n)]) for n in s["ppl_lengths"]]
        row += [f"{100 * m['passkey'][str(n)]:.0f}%" for n in s["passkey_lengths"]]
        row += [f"{_ppl(m[k]['full'])} / {_ppl(m[k]['short'])}" for k in ("far_corpus", "far_synthetic")]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Cost of each extension run ({s['extend_iters']} steps of {s['extend_batch'] * s['seq_length']} "
              f"tokens, {s['nproc']} CPU processes; wall time includes start-up; CPU time is summed over processes):",
              "", "| Method | train length | wall time (s) | CPU time (s) | tokens/s | ms/step | peak memory per process (GiB) | final loss |",
              "|---|---|---|---|---|---|---|---|"]
    for label, m in models.items():
        c = m.get("cost")
        if not c:
            continue
        length = s["target_length"] if label == "full-length" else s["seq_length"]
        lines.append(f"| {LABELS.get(label, label)} | {length} | {_fmt(c['wall_seconds'], 0)} | {_fmt(c['cpu_seconds'], 0)} | "
                     f"{_fmt(c['tokens_per_s'], 0)} | {_fmt(c['ms_per_it'], 0)} | {_fmt(c['peak_mem_gib'])} | {_fmt(c['final_loss'], 3)} |")
    p = summary["pretrain"]
    lines += ["", f"Pretraining: {s['pretrain_iters']} steps of {s['pretrain_batch'] * s['seq_length']} tokens, "
              f"wall {_fmt(p['wall_seconds'], 0)} s, CPU {_fmt(p['cpu_seconds'], 0)} s, {_fmt(p['tokens_per_s'], 0)} tokens/s, "
              f"final training loss {_fmt(p['final_loss'], 3)}.", ""]
    if p.get("validation"):
        lines.append("Pretraining validation (held-out split of the mixture): " + ", ".join(
            f"step {v['iteration']}: ppl {v['ppl']:.2f}" for v in p["validation"]) + ".")
    return "\n".join(lines) + "\n"


def plot_summary(summary: dict, path: Path) -> Optional[Path]:
    """Perplexity and passkey accuracy against length, one line per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("matplotlib is not installed: no figure")
        return None
    s, models = summary["settings"], summary["models"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, m in models.items():
        style = {"linestyle": "--"} if label in ("base", "randpos", "pi-only") else {}
        ppl = [m["perplexity"][str(n)] for n in s["ppl_lengths"]]
        left.plot(s["ppl_lengths"], ppl, marker="o", label=LABELS.get(label, label), **style)
        acc = [100 * m["passkey"][str(n)] for n in s["passkey_lengths"]]
        right.plot(s["passkey_lengths"], acc, marker="o", label=LABELS.get(label, label), **style)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(s["ppl_lengths"])
        ax.set_xticklabels([str(n) for n in s["ppl_lengths"]])
        ax.axvline(s["seq_length"], color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("evaluation length (tokens)")
        ax.grid(alpha=0.3)
    left.set_yscale("log")
    left.set_ylabel("perplexity (held-out corpus)")
    left.set_title("Sliding-window perplexity")
    right.set_ylabel("passkey accuracy (%)")
    right.set_ylim(-5, 105)
    right.set_title("Passkey retrieval")
    right.legend(fontsize=8, loc="best")
    fig.suptitle(f"{s['model']} model, trained at {s['seq_length']}, extended to {s['target_length']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "outputs" / "reproduce"), help="output directory")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps: every stage in < 3 min")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {ALL_METHODS}")
    parser.add_argument("--seed", type=int, default=None, help="seed of pretraining and extension")
    parser.add_argument("--force", action="store_true", help="redo every stage")
    parser.add_argument("--docs-dir", default=None, help="copy summary, tables and figures here (e.g. docs)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = dataclasses.replace(QUICK if args.quick else FULL)
    if args.methods:
        settings.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        for m in settings.methods:
            method_flags(m, settings)  # validates the name
    if args.seed is not None:
        settings.seed = args.seed
    repro = Reproduction(settings, Path(args.out).resolve(), force=args.force)
    repro.state["settings"] = dataclasses.asdict(settings)
    repro.run(Path(args.docs_dir).resolve() if args.docs_dir else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
