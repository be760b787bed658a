"""A small end-to-end reproduction of the PoSE paper's comparison (its Table 1) on CPU.

    python -m experiments.pose_small.reproduce --out outputs/reproduce            # the full run (~1 h, 2 cores)
    python -m experiments.pose_small.reproduce --quick --out /tmp/reproduce_quick # every stage, < 3 min

Stages (each writes its outputs under --out and is skipped when they exist; --force redoes all):
1. data      the sample corpus, synthetic passkey-style retrieval documents (synthetic.py) for
             pretraining (window-long) and extension (target-long), a held-out copy of each, and
             held-out corpus documents cut to a fixed length; all tokenized by tools/preprocess_data.py
2. pretrain  a small LLaMA at the short window on corpus + short retrieval documents (50/50 blend)
3. extend    six extensions from the pretrained weights (--finetune), same steps, schedule and tokens
             per step, on corpus + long retrieval documents: PoSE with linear / NTK / revised YaRN,
             full-length training, PI-only and RandPos
4. evaluate  tools/eval_perplexity.py, tools/eval_passkey.py and tools/eval_far_tokens.py on the
             base and every extended model
5. report    summary.json, tables (report.md) and the figure (results.png); --docs-dir copies them
Every training and evaluation step is a subprocess of the project's own entry points (2 gloo
processes); training cost comes from the trainer's --metrics-file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional

from experiments.pose_small import synthetic
from experiments.pose_small.settings import ALL_METHODS, FULL, QUICK, Settings, method_flags
from experiments.pose_small.summary import build_summary, plot_summary, render_markdown
from pose_megatron.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
"""The checkout: tools/ are run from it."""


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


def read_training_metrics(path: Path) -> dict:
    """Throughput, memory, final loss and validations from the trainer's --metrics-file (one JSON
    object a line: training steps carry "loss", validation passes "validation_loss"). The first
    step, which includes warm-up, is left out of the throughput when later ones exist."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the trainer writes it when run with --metrics-file")
    steps, validation = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "validation_loss" in record:
            validation.append({"iteration": record["iteration"], "loss": record["validation_loss"],
                               "ppl": record["validation_ppl"]})
        elif "loss" in record:
            steps.append(record)
    if not steps:
        raise ValueError(f"{path} records no training step; rerun the stage with --force")
    timed = steps[1:] or steps
    return {
        "tokens_per_s": statistics.median(s["tokens_per_s"] for s in timed),
        "ms_per_it": statistics.median(s["ms_per_it"] for s in timed),
        "peak_mem_gib": max(s["peak_memory_gib"] for s in steps),
        "final_loss": steps[-1]["loss"],
        "validation": validation,
    }


def write_eval_documents(valid_jsonl: str, output: Path, tokenizer, num_tokens: int, num_docs: int) -> int:
    """Held-out corpus documents cut to about `num_tokens` tokens (so every window length scores
    the same tokens and evaluation time is bounded); documents shorter than that are skipped."""
    kept = 0
    with open(valid_jsonl) as source, open(output, "w") as out:
        for line in source:
            ids = tokenizer.tokenize(json.loads(line)["text"])
            if len(ids) < num_tokens + 16:
                continue
            out.write(json.dumps({"text": tokenizer.detokenize(ids[:num_tokens])}) + "\n")
            kept += 1
            if kept >= num_docs:
                break
    if kept == 0:
        raise ValueError(f"no held-out document has {num_tokens} tokens")
    return kept


class Reproduction:
    """The stages, each cached in state.json under --out (and redone when its outputs are gone)."""

    def __init__(self, settings: Settings, out: Path, force: bool = False):
        self.s = settings
        self.out = out
        self.force = force
        for sub in ("data", "checkpoints", "logs", "eval"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        self.state_file = out / "state.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.exists() and not force else {}

    def _save_state(self) -> None:
        atomic_write_text(self.state_file, json.dumps(self.state, indent=2))

    def _done(self, key: str, *paths: Path) -> bool:
        return not self.force and key in self.state and all(p.exists() for p in paths)

    # 1 ------------------------------------------------------------------------------------------
    def data(self) -> dict:
        if self._done("data", self.out / "data" / "manifest.json"):
            return self.state["data"]
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
        atomic_write_text(data_dir / "manifest.json", json.dumps(manifest, indent=2))
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

    # 2, 3 ---------------------------------------------------------------------------------------
    def _train(self, key: str, checkpoint: str, message: str, flags: List[str], **record) -> dict:
        """One training run into checkpoints/<checkpoint>, recorded in the state under `key` with
        its cost, its --metrics-file summary and `record`; skipped when already done."""
        ckpt = self.out / "checkpoints" / checkpoint
        if self._done(key, ckpt / "latest_checkpointed_iteration.txt"):
            return self.state[key]
        stem = key.replace("/", "_")
        metrics = self.out / "logs" / f"{stem}_metrics.jsonl"
        _log(message)
        shutil.rmtree(ckpt, ignore_errors=True)
        metrics.unlink(missing_ok=True)  # the trainer appends: a redone stage starts a fresh record
        d = self.state["data"]
        cost = run_tool(["-m", "pose_megatron.train"] + flags + [
            "--model", self.s.model, "--tokenizer-model", d["tokenizer_model"], "--precision", "fp32",
            "--save", str(ckpt), "--metrics-file", str(metrics),
            "--data-cache-path", str(self.out / "data" / "index_cache"),
        ], self.out / "logs" / f"{stem}.log", True, self.s.nproc)
        self.state[key] = {**cost, **read_training_metrics(metrics), "checkpoint": str(ckpt), **record}
        self._save_state()
        return self.state[key]

    def _mixture(self, synthetic_prefix: str) -> List[str]:
        """Half corpus, half synthetic retrieval documents."""
        return ["--data-path", "0.5", self.state["data"]["corpus_train"], "0.5", self.state["data"][synthetic_prefix]]

    def _pretraining_window(self) -> List[str]:
        """Contiguous positions at the short window, no RoPE scaling."""
        s = self.s
        return ["--seq-length", str(s.seq_length), "--pose-content", "contiguous",
                "--pose-content-window", str(s.seq_length), "--rope-type", "default",
                "--micro-batch-size", str(s.pretrain_batch // s.nproc), "--global-batch-size", str(s.pretrain_batch)]

    def pretrain(self) -> dict:
        s = self.s
        return self._train("pretrain", "base", f"pretraining {s.model} at {s.seq_length} for {s.pretrain_iters} steps",
                           self._pretraining_window() + self._mixture("synth_pretrain") + [
            "--train-iters", str(s.pretrain_iters), "--lr", str(s.pretrain_lr), "--min-lr", str(s.pretrain_lr / 10),
            "--lr-warmup-iters", str(s.pretrain_warmup), "--lr-decay-style", "cosine", "--split", "98,2,0",
            "--eval-interval", str(s.eval_interval), "--eval-iters", str(s.eval_iters),
            "--log-interval", str(max(1, s.eval_interval // 2)), "--seed", str(s.seed)])

    def pretrain_more(self) -> dict:
        """Continue pretraining from `base` on the same mixture with a fresh schedule."""
        s = self.s
        return self._train("pretrain_more", "pretrained", f"continuing pretraining for {s.pretrain_more_iters} steps",
                           self._pretraining_window() + self._mixture("synth_pretrain") + [
            "--train-iters", str(s.pretrain_more_iters), "--lr", str(s.pretrain_more_lr),
            "--min-lr", str(s.pretrain_more_lr / 10), "--lr-warmup-iters", "10", "--lr-decay-style", "cosine",
            "--split", "100,0,0", "--eval-iters", "0", "--log-interval", "25", "--seed", str(s.pretrain_more_seed),
            "--load", str(self.out / "checkpoints" / "base"), "--finetune"])

    @property
    def pretrained(self) -> Path:
        """The checkpoint every extension starts from (and the table's base model)."""
        name = "pretrained" if self.s.pretrain_more_iters else "base"
        return self.out / "checkpoints" / name

    def extend(self, method: str) -> dict:
        s = self.s
        return self._train(f"extend/{method}", method,
                           f"extending with {method}: {s.extend_iters} steps of {s.tokens_per_step} tokens",
                           method_flags(method, s) + self._mixture("synth_extend") + [
            "--load", str(self.pretrained), "--finetune",
            "--train-iters", str(s.extend_iters), "--lr", str(s.extend_lr), "--min-lr", "0",
            "--lr-warmup-iters", str(s.extend_warmup), "--lr-decay-style", "linear",
            "--split", "100,0,0", "--eval-iters", "0", "--log-interval", str(max(1, s.extend_iters // 10)),
            "--seed", str(s.seed)], tokens_per_step=s.tokens_per_step, steps=s.extend_iters)

    # 4 ------------------------------------------------------------------------------------------
    def checkpoints(self) -> List[List[str]]:
        pairs = [["base", str(self.pretrained)]]
        pairs += [[m, str(self.out / "checkpoints" / m)] for m in self.s.methods]
        return pairs

    def evaluate(self) -> dict:
        s, d = self.s, self.state["data"]
        labels = [label for label, _ in self.checkpoints()]
        common = ["--tokenizer-model", d["tokenizer_model"], "--no-progress"]
        for label, path in self.checkpoints():
            common += ["--load", path, "--label", label]
        jobs = {
            "perplexity": ["--data-path", d["eval_corpus"], "--lengths", ",".join(map(str, s.ppl_lengths)),
                           "--stride", str(s.ppl_stride), "--num-docs", str(s.eval_docs),
                           "--min-doc-tokens", str(s.target_length)],
            "passkey": ["--lengths", ",".join(map(str, s.passkey_lengths)), "--trials", str(s.passkey_trials),
                        "--max-new-tokens", "7", "--seed", "0"],
            "far_tokens": ["--far-start", str(s.target_length // 2), "--far-end", str(s.target_length),
                           "--short-window", str(s.seq_length), "--stride", str(s.far_stride),
                           "--num-docs", str(s.far_docs), "--data-path", d["eval_corpus"], d["synth_extend_valid"],
                           "--data-name", "corpus", "synthetic"],
        }
        for name, args in jobs.items():
            output = self.out / "eval" / f"{name}.json"
            key = f"eval/{name}"
            if self._done(key, output) and self.state[key].get("labels") == labels:
                continue
            _log(f"evaluating {name} of {len(labels)} checkpoints")
            cost = run_tool([str(ROOT / "tools" / f"eval_{name}.py")] + args + common + ["--output", str(output)],
                            self.out / "logs" / f"eval_{name}.log", True, s.nproc)
            self.state[key] = {**cost, "labels": labels, "output": str(output)}
            self._save_state()
        return {name: json.loads((self.out / "eval" / f"{name}.json").read_text()) for name in jobs}

    # 5 ------------------------------------------------------------------------------------------
    def report(self, results: dict, docs_dir: Optional[Path]) -> dict:
        labels = [label for label, _ in self.checkpoints()]
        summary = build_summary(self.s, self.state, labels, results)
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
        atomic_write_text(self.out / "report.md", render_markdown(summary))
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
