"""A small end-to-end reproduction of the PoSE paper's comparison (its Table 1) on CPU.

    python -m experiments.pose_small.reproduce --out outputs/reproduce            # the full run (~150 CPU-min)
    python -m experiments.pose_small.reproduce --quick --out /tmp/reproduce_quick # every stage, minutes

Stages (each cached in state.json under --out; see stages.py; --force redoes all):
1. data/pretrain  the sample corpus and window-long synthetic retrieval documents (synthetic.py)
2. data/extend    target-long retrieval documents (training and held out, with the held-out
                  answers' token spans), held-out corpus documents cut to a fixed length
3. pretrain/k     a small LLaMA at the short window on corpus + retrieval documents (50/50), one
                  schedule cut into parts that resume each other
4. extend/<run>   every method over its seeds from the pretrained weights (--finetune), all with the
                  same steps and sequences per step (the paper's protocol; full-length at equal
                  tokens as the second comparison), plus the added setting for linear interpolation
5. eval/<k>       tools/eval_perplexity.py, eval_passkey.py and eval_far_tokens.py over a group of
                  checkpoints (the base model and the extensions)
6. report         summary.json, report.md (tables with seed means and spreads), results.png
Every training and evaluation step is a subprocess of the project's own entry points (2 gloo
processes); training cost comes from the trainer's --metrics-file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

from experiments.pose_small import synthetic
from experiments.pose_small.settings import FULL, QUICK, Run, Settings, extension_runs, method_flags
from experiments.pose_small.stages import (ROOT, StageCache, content_hash, log, read_training_metrics,
                                          run_tool, timed)
from experiments.pose_small.summary import build_summary
from experiments.pose_small.tables import plot_summary, render_markdown
from pose_megatron.files import atomic_write_text

EVAL_TASKS = ("perplexity", "passkey", "far_tokens")


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


def write_answer_spans(prefix: str, jsonl: Path, output: Path, tokenizer, window: int) -> dict:
    """The far-token tool's span file for held-out retrieval documents: per document, the digits
    of the answers a `window`-token context cannot copy (synthetic.far_answer_spans), located in
    the tokens exactly as the tool reads them (the preprocessed prefix, BOS and EOD stripped)."""
    from pose_megatron.evaluation.documents import load_documents

    keys = [json.loads(line)["key"] for line in jsonl.read_text().splitlines()]
    docs = load_documents(prefix, min_tokens=1, tokenizer=tokenizer)
    if docs.indices != list(range(len(keys))):
        raise ValueError(f"{prefix} does not hold the {len(keys)} documents of {jsonl} in order")
    spans = [synthetic.far_answer_spans(d, key, tokenizer, window) for d, key in zip(docs.documents, keys)]
    atomic_write_text(output, "".join(json.dumps({"spans": s}) + "\n" for s in spans))
    return {"documents": len(spans), "far_answers": sum(map(len, spans)),
            "far_answer_tokens": sum(b - a for s in spans for a, b in s)}


def _source_hash(module) -> str:
    """Hash of a module's source: data stages redo when the generator code changes."""
    return content_hash([module.__file__])


class Reproduction:
    """The stages, in order; each is skipped when state.json records it with the same inputs."""

    def __init__(self, settings: Settings, out: Path, force: bool = False):
        self.s, self.out = settings, out
        for sub in ("data", "checkpoints", "logs", "eval"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        self.cache = StageCache(out, force)
        self.runs = extension_runs(settings)

    # 1, 2 ---------------------------------------------------------------------------------------
    def _data_stage(self, key: str, fingerprint: dict, build) -> dict:
        manifest = self.out / "data" / f"{key.split('/')[1]}.json"
        fingerprint = {**fingerprint, "code": _source_hash(synthetic)}
        record = self.cache.get(key, fingerprint, manifest)
        if record:
            return record
        log(f"building {key}")
        from pose_megatron.corpus import ensure_sample_corpus
        from pose_megatron.tokenizer import build_tokenizer

        with timed() as cost:
            corpus = ensure_sample_corpus()
            tokenizer = build_tokenizer(corpus.tokenizer_type, corpus.tokenizer_model)
            built, written = build(corpus, tokenizer, synthetic.filler_tokens_per_word(tokenizer))
            built.update(tokenizer_model=corpus.tokenizer_model)
            atomic_write_text(manifest, json.dumps(built, indent=2))
        # Downstream stages depend on what was written, not on the code that wrote it.
        content = content_hash(written + [corpus.tokenizer_model, corpus.train_prefix + ".idx"])
        return self.cache.put(key, fingerprint, {**built, **cost, "content": content})

    def _synthetic(self, name: str, spec, count: int, seed: int, tokenizer) -> dict:
        path = self.out / "data" / f"{name}.jsonl"
        synthetic.write_retrieval_jsonl(str(path), spec, count, seed)
        return {"jsonl": str(path), **synthetic.describe(spec, tokenizer, sample=20, seed=seed),
                "documents": count, "seed": seed}

    def data_pretrain(self) -> dict:
        s = self.s

        def build(corpus, tokenizer, tpw):
            synth = self._synthetic("synth_pretrain", synthetic.pretraining_spec(s.seq_length, tpw),
                                    s.synth_pretrain_docs, 1, tokenizer)
            return {"corpus_train": corpus.train_prefix, "corpus_valid_jsonl": corpus.valid_jsonl,
                    "filler_tokens_per_word": tpw, "synth_pretrain": synth,
                    "synth_pretrain_prefix": self._preprocess([Path(synth["jsonl"])], corpus.tokenizer_model)[0],
                    }, [synth["jsonl"]]

        return self._data_stage("data/pretrain", {"window": s.seq_length, "docs": s.synth_pretrain_docs}, build)

    def data_extend(self) -> dict:
        s = self.s

        def build(corpus, tokenizer, tpw):
            spec = synthetic.extension_spec(s.target_length, s.seq_length, tpw)
            train = self._synthetic("synth_extend", spec, s.synth_extend_docs, 2, tokenizer)
            valid = self._synthetic("synth_extend_valid", spec, s.far_docs, 102, tokenizer)
            eval_jsonl = self.out / "data" / "eval_corpus.jsonl"
            kept = write_eval_documents(corpus.valid_jsonl, eval_jsonl, tokenizer,
                                        s.target_length + s.target_length // 16, max(s.eval_docs, s.far_docs))
            prefixes = self._preprocess([Path(train["jsonl"]), Path(valid["jsonl"]), eval_jsonl], corpus.tokenizer_model)
            spans = self.out / "data" / "synth_extend_valid_answers.jsonl"
            answers = write_answer_spans(prefixes[1], Path(valid["jsonl"]), spans, tokenizer, s.seq_length)
            return {"synth_extend": train, "synth_extend_valid": {**valid, **answers},
                    "eval_corpus_documents": kept, "synth_extend_prefix": prefixes[0],
                    "synth_extend_valid_prefix": prefixes[1], "eval_corpus_prefix": prefixes[2],
                    "synth_extend_valid_spans": str(spans)}, [train["jsonl"], valid["jsonl"], str(eval_jsonl), str(spans)]

        return self._data_stage("data/extend", {"window": s.seq_length, "target": s.target_length,
                                                "docs": [s.synth_extend_docs, s.far_docs, s.eval_docs]}, build)

    def _preprocess(self, jsonls: List[Path], tokenizer_model: str) -> List[str]:
        """Tokenize JSONL files (BOS + text + EOD per document, the library function behind
        tools/preprocess_data.py, in this process); returns their prefixes."""
        from pose_megatron.preprocess import PreprocessConfig, output_prefix_for_key, preprocess_jsonl

        prefixes = []
        for jsonl in jsonls:
            prefix = str(jsonl.with_suffix(""))
            preprocess_jsonl(PreprocessConfig(input=str(jsonl), output_prefix=prefix, tokenizer_type="sentencepiece",
                                              tokenizer_model=tokenizer_model, prepend_bos=True, append_eod=True,
                                              progress=False, overwrite=True))
            prefixes.append(output_prefix_for_key(prefix, "text"))
        return prefixes

    # 3, 4 ---------------------------------------------------------------------------------------
    def _train(self, key: str, checkpoint: Path, flags: List[str], depends: List[str], resume: bool = False,
               **record) -> dict:
        """One trainer run into `checkpoint`, recorded under `key` with its cost and its
        --metrics-file summary; `resume` continues the checkpoint's run instead of starting afresh.
        `depends`: the stages it reads (a change there redoes it)."""
        fingerprint = {"flags": flags, "inputs": {k: self.cache.identity(k) for k in depends}}
        done = self.cache.get(key, fingerprint, checkpoint / "latest_checkpointed_iteration.txt")
        if done:
            return done
        stem = key.replace("/", "_")
        metrics = self.out / "logs" / f"{stem}_metrics.jsonl"
        log(f"training {key}")
        if not resume:
            shutil.rmtree(checkpoint, ignore_errors=True)
        metrics.unlink(missing_ok=True)  # the trainer appends: a redone stage starts a fresh record
        cost = run_tool(["-m", "pose_megatron.train"] + flags + ["--metrics-file", str(metrics)],
                        self.out / "logs" / f"{stem}.log", self.s.nproc)
        return self.cache.put(key, fingerprint, {**cost, **read_training_metrics(metrics),
                                                 "checkpoint": str(checkpoint), **record})

    def _common(self, checkpoint: Path) -> List[str]:
        return ["--model", self.s.model, "--tokenizer-model", self.cache.state["data/pretrain"]["tokenizer_model"],
                "--precision", "fp32", "--save", str(checkpoint),
                "--data-cache-path", str(self.out / "data" / "index_cache")]

    def _mixture(self, synthetic_prefix: str) -> List[str]:
        """Half corpus, half synthetic retrieval documents."""
        data = self.cache.state
        return ["--data-path", "0.5", data["data/pretrain"]["corpus_train"], "0.5", synthetic_prefix]

    @property
    def base(self) -> Path:
        """The pretrained checkpoint every extension starts from (the table's base model)."""
        return self.out / "checkpoints" / "base"

    def pretrain(self) -> List[dict]:
        """One cosine schedule, cut into `pretrain_parts` stages that resume each other."""
        s = self.s
        part = -(-s.pretrain_iters // s.pretrain_parts)
        flags = ["--seq-length", str(s.seq_length), "--pose-content", "contiguous", "--pose-content-window",
                 str(s.seq_length), "--rope-type", "default", "--micro-batch-size", str(s.pretrain_batch // s.nproc),
                 "--global-batch-size", str(s.pretrain_batch), "--train-iters", str(s.pretrain_iters),
                 "--lr", str(s.pretrain_lr), "--min-lr", str(s.pretrain_lr / 10),
                 "--lr-warmup-iters", str(s.pretrain_warmup), "--lr-decay-style", "cosine", "--split", "98,2,0",
                 "--eval-interval", str(s.eval_interval), "--eval-iters", str(s.eval_iters),
                 "--log-interval", str(max(1, s.eval_interval // 4)), "--seed", str(s.pretrain_seed),
                 "--exit-interval", str(part)] + self._common(self.base)
        flags += self._mixture(self.cache.state["data/pretrain"]["synth_pretrain_prefix"])
        records = []
        for k in range(1, s.pretrain_parts + 1):
            resume = ["--load", str(self.base)] if k > 1 else []
            until = min(k * part, s.pretrain_iters)
            depends = ["data/pretrain"] + ([f"pretrain/{k - 1}"] if k > 1 else [])
            records.append(self._train(f"pretrain/{k}", self.base, flags + resume, depends, resume=k > 1,
                                       until=until))
            reached = int((self.base / "latest_checkpointed_iteration.txt").read_text().strip())
            if k == s.pretrain_parts and reached != s.pretrain_iters:
                raise RuntimeError(f"pretraining ended at iteration {reached}, not {s.pretrain_iters}: "
                                   "see logs/pretrain_*.log, then rerun (finished parts are kept)")
        return records

    def extend(self, run: Run) -> dict:
        s = self.s
        flags = method_flags(run.method, s) + self._mixture(self.cache.state["data/extend"]["synth_extend_prefix"]) + [
            "--load", str(self.base), "--finetune", "--train-iters", str(run.steps), "--lr", str(run.lr),
            "--min-lr", "0", "--lr-warmup-iters", str(s.extend_warmup), "--lr-decay-style", "linear",
            "--split", "100,0,0", "--eval-iters", "0", "--log-interval", str(max(1, run.steps // 8)),
            "--seed", str(run.seed), "--pose-min-doc-length", str(s.target_length + 1),
        ] + self._common(self.out / "checkpoints" / run.label)
        batch = int(flags[flags.index("--global-batch-size") + 1])
        length = int(flags[flags.index("--seq-length") + 1])
        return self._train(f"extend/{run.label}", self.out / "checkpoints" / run.label, flags,
                           ["data/pretrain", "data/extend", self.last_pretrain], run=dataclasses.asdict(run),
                           sequences_per_step=batch, train_length=length, tokens_per_step=batch * length)

    @property
    def last_pretrain(self) -> str:
        return f"pretrain/{self.s.pretrain_parts}"

    # 5 ------------------------------------------------------------------------------------------
    def checkpoints(self) -> List[List[str]]:
        """[label, path] of the base model and every extension, in table order."""
        return [["base", str(self.base)]] + [[r.label, str(self.out / "checkpoints" / r.label)] for r in self.runs]

    def _eval_args(self, task: str) -> List[str]:
        s, d = self.s, self.cache.state["data/extend"]
        if task == "perplexity":
            return ["--data-path", d["eval_corpus_prefix"], "--lengths", ",".join(map(str, s.ppl_lengths)),
                    "--stride", str(s.ppl_stride), "--num-docs", str(s.eval_docs), "--min-doc-tokens", str(s.target_length)]
        if task == "passkey":
            return ["--lengths", ",".join(map(str, s.passkey_lengths)), "--trials", str(s.passkey_trials),
                    "--max-new-tokens", str(s.passkey_new_tokens), "--seed", "0"]
        return ["--far-start", str(s.target_length // 2), "--far-end", str(s.target_length),
                "--short-window", str(s.seq_length), "--stride", str(s.far_stride), "--num-docs", str(s.far_docs),
                "--data-path", d["eval_corpus_prefix"], d["synth_extend_valid_prefix"],
                "--data-name", "corpus", "synthetic", "--score-spans", f"synthetic={d['synth_extend_valid_spans']}"]

    def evaluate(self) -> Dict[str, list]:
        """The three tools over each group of checkpoints; returns each task's outputs (one per group)."""
        pairs = self.checkpoints()
        size = self.s.eval_group_size
        outputs: Dict[str, list] = {task: [] for task in EVAL_TASKS}
        for g, first in enumerate(range(0, len(pairs), size), 1):
            group = pairs[first:first + size]
            selection = ["--tokenizer-model", self.cache.state["data/pretrain"]["tokenizer_model"], "--no-progress"]
            for label, path in group:
                selection += ["--load", path, "--label", label]
            jobs = {task: [str(ROOT / "tools" / f"eval_{task}.py")] + self._eval_args(task) + selection + [
                "--output", str(self.out / "eval" / f"{task}_{g}.json")] for task in EVAL_TASKS}
            key = f"eval/{g}"
            files = [self.out / "eval" / f"{task}_{g}.json" for task in EVAL_TASKS]
            trained = [self.last_pretrain if label == "base" else f"extend/{label}" for label, _ in group]
            fingerprint = {"jobs": jobs, "inputs": {k: self.cache.identity(k) for k in ["data/extend"] + trained}}
            if not self.cache.get(key, fingerprint, *files):
                log(f"evaluating group {g}: {', '.join(label for label, _ in group)}")
                with timed() as cost:
                    for task, args in jobs.items():
                        run_tool(args, self.out / "logs" / f"eval_{task}_{g}.log", self.s.nproc)
                self.cache.put(key, fingerprint, {**cost, "labels": [label for label, _ in group]})
            for task, path in zip(EVAL_TASKS, files):
                outputs[task].append(json.loads(path.read_text()))
        return outputs

    # 6 ------------------------------------------------------------------------------------------
    def report(self, results: Dict[str, list], docs_dir: Optional[Path]) -> dict:
        summary = build_summary(self.s, self.cache, self.runs, results)
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
        atomic_write_text(self.out / "report.md", render_markdown(summary))
        plot_summary(summary, self.out / "results.png")
        if docs_dir is not None:
            docs_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.out / "summary.json", docs_dir / "results_summary.json")
            shutil.copy(self.out / "report.md", docs_dir / "results_tables.md")
            if (self.out / "results.png").exists():
                shutil.copy(self.out / "results.png", docs_dir / "results.png")
        return summary

    def run(self, docs_dir: Optional[Path] = None, until: Optional[str] = None) -> Optional[dict]:
        """Every stage in order; `until` stops after the named step (data, pretrain, extend, evaluate)."""
        for step in ("data", "pretrain", "extend", "evaluate"):
            if step == "data":
                self.data_pretrain()
                self.data_extend()
            elif step == "pretrain":
                self.pretrain()
            elif step == "extend":
                for run in self.runs:
                    self.extend(run)
            else:
                results = self.evaluate()
            if until == step:
                log(f"stopped after {step} (--until); outputs in {self.out}")
                return None
        summary = self.report(results, docs_dir)
        total = sum(c["cpu_seconds"] for c in self.cache.costs().values())
        log(f"done: all stages {total / 60:.1f} CPU-minutes; outputs in {self.out}")
        return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "outputs" / "reproduce"), help="output directory")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps: every stage in minutes")
    parser.add_argument("--force", action="store_true", help="redo every stage")
    parser.add_argument("--until", choices=["data", "pretrain", "extend", "evaluate"], default=None,
                        help="stop after this step (the rest runs in a later invocation)")
    parser.add_argument("--docs-dir", default=None, help="copy summary, tables and figure here (e.g. docs)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = dataclasses.replace(QUICK if args.quick else FULL)
    repro = Reproduction(settings, Path(args.out).resolve(), force=args.force)
    repro.run(Path(args.docs_dir).resolve() if args.docs_dir else None, until=args.until)
    return 0


if __name__ == "__main__":
    sys.exit(main())
