"""The small reproduction's numbers: per checkpoint, per table row (a method over its seeds), and
the comparisons the paper's claims rest on.

Everything comes from the evaluation tools' JSON outputs and the driver's stage records (training
cost from the trainer's --metrics-file), so the report can be redone without re-running anything.
A row's value is the mean over its seeds; its spread is the largest distance of a seed from that
mean, so mean +- spread holds every seed. A difference between two rows counts as real only when
it exceeds the sum of their spreads (the seed ranges do not overlap). A one-seed row has no spread
of its own; it is given the spread of the row it is compared with (its seeds would vary as much),
so that a single lucky seed cannot make a difference real.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

from experiments.pose_small.settings import Run, Settings

LABELS = {"base": "No fine-tuning (base)", "pose-linear": "PoSE-Linear", "pose-ntk": "PoSE-NTK",
          "pose-yarn-revised": "PoSE-YaRN (revised)", "full-length": "Full-length",
          "full-length-equal-tokens": "Full-length, equal tokens", "pi-only": "PI-only", "randpos": "RandPos"}

MAIN_ROWS = ["base", "pose-linear", "pose-ntk", "pose-yarn-revised", "full-length", "pi-only", "randpos"]
"""Rows of the main table (the paper's protocol: same steps and sequences per step)."""
EQUAL_TOKEN_ROWS = [r if r != "full-length" else "full-length-equal-tokens" for r in MAIN_ROWS]
"""Rows of the equal-tokens table: only the full-length row differs."""
POSE_ROWS = ["pose-linear", "pose-ntk", "pose-yarn-revised"]


def stat(values: Sequence[float]) -> dict:
    """Mean, spread (largest |value - mean|) and the values themselves."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    return {"mean": mean, "spread": max(abs(v - mean) for v in values), "values": values, "n": len(values)}


def _checkpoint_numbers(label: str, results: Dict[str, list]) -> dict:
    """One checkpoint's metrics from the tools' outputs (each task has one output per group)."""
    def find(task: str, pick):
        for output in results[task]:
            found = pick(output)
            if found is not None:
                return output, found
        raise KeyError(f"no {task} result for checkpoint {label!r}: rerun the evaluation stages")

    _, ppl = find("perplexity", lambda o: o["results"].get(label))
    pk_out, pk = find("passkey", lambda o: o["results"].get(label))
    far_out, _ = find("far_tokens", lambda o: o["results"]["corpus"].get(label))
    far = {name: far_out["results"][name][label] for name in far_out["results"]}
    return {
        "perplexity": {n: r["perplexity"] for n, r in ppl.items()},
        "passkey": {n: r["accuracy"] for n, r in pk["by_length"].items()},
        "passkey_trials": {n: r["trials"] for n, r in pk["by_length"].items()},
        "passkey_skipped": pk_out["skipped"]["by_length"],
        "far": {name: {"full": r["full_perplexity"], "short": r["short_perplexity"], "ratio": r["ratio"],
                       "tokens": r["tokens_scored"], "marked_only": r["marked_only"]} for name, r in far.items()},
    }


def _cost(record: dict) -> dict:
    keys = ("wall_seconds", "cpu_seconds", "tokens_per_s", "ms_per_it", "peak_mem_gib", "final_loss",
            "sequences_per_step", "tokens_per_step", "train_length", "steps")
    return {k: record.get(k) for k in keys}


def _aggregate(members: List[dict]) -> dict:
    """Mean and spread of every metric over a row's checkpoints."""
    first = members[0]
    row = {"perplexity": {n: stat([m["perplexity"][n] for m in members]) for n in first["perplexity"]},
           "passkey": {n: stat([m["passkey"][n] for m in members]) for n in first["passkey"]},
           "far": {name: {k: stat([m["far"][name][k] for m in members]) for k in ("full", "short", "ratio")}
                   for name in first["far"]}}
    if "cost" in first:
        row["cost"] = {k: stat([m["cost"][k] for m in members]) for k in first["cost"] if first["cost"][k] is not None}
    return row


def build_summary(s: Settings, cache, runs: List[Run], results: Dict[str, list]) -> dict:
    """Everything the tables and the figure show, in one JSON-able dict."""
    state = cache.state
    checkpoints = {"base": _checkpoint_numbers("base", results)}
    for run in runs:
        checkpoints[run.label] = {**_checkpoint_numbers(run.label, results),
                                  "cost": _cost(state[f"extend/{run.label}"]), "run": dataclasses.asdict(run)}
    settings = dataclasses.asdict(s)
    rows: Dict[str, dict] = OrderedDict()
    for setting in ("main", "fair"):
        for method in LABELS:  # "base" first
            labels = ["base"] if method == "base" else [r.label for r in runs if r.method == method and r.setting == setting]
            if not labels or (method == "base" and setting != "main"):
                continue
            key = method if setting == "main" else f"{method}.{setting}"
            rows[key] = {"method": method, "setting": setting, "labels": labels,
                         **_aggregate([checkpoints[label] for label in labels])}
            rows[key]["flatness"] = flatness(rows[key], settings)
    pretrain = [state[k] for k in state if k.startswith("pretrain/")]
    summary = {
        "settings": settings,
        "checkpoints": checkpoints,
        "rows": rows,
        "pretrain": {"validation": [v for part in pretrain for v in part["validation"]],
                     "final_loss": pretrain[-1]["final_loss"] if pretrain else None,
                     "tokens_per_s": stat([p["tokens_per_s"] for p in pretrain]) if pretrain else None},
        "stages": cache.costs(),
        "data": {k: {f: v for f, v in state[k].items() if f not in ("fingerprint",)} for k in state if k.startswith("data/")},
        "far_protocol": results["far_tokens"][0]["protocol"],
        "passkey_protocol": results["passkey"][0]["protocol"],
        "ppl_data": results["perplexity"][0]["data"],
    }
    summary["comparisons"] = comparisons(summary)
    return summary


def difference(rows: dict, a: str, b: str, metric: str, length: Optional[str] = None, far: Optional[str] = None,
               field: str = "full") -> Optional[dict]:
    """a minus b on one metric, with both spreads and whether the difference exceeds them."""
    if a not in rows or b not in rows:
        return None

    def pick(row):
        return row["far"][far][field] if metric == "far" else row[metric][length]

    x, y = pick(rows[a]), pick(rows[b])
    gap = x["mean"] - y["mean"]
    spread_a = x["spread"] if x["n"] > 1 else y["spread"]
    spread_b = y["spread"] if y["n"] > 1 else x["spread"]
    spreads = spread_a + spread_b
    known = x["n"] > 1 or y["n"] > 1
    return {"a": a, "b": b, "metric": metric, "length": length, "far": far, "field": field,
            "a_mean": x["mean"], "b_mean": y["mean"], "difference": gap, "spreads": spreads,
            "real": known and abs(gap) > spreads}


def flatness(row: dict, s: dict) -> dict:
    """Perplexity at L_t over perplexity at L_c, per seed (how much a model degrades with length)."""
    lc, lt = str(s["seq_length"]), str(s["target_length"])
    ratios = [t / c for t, c in zip(row["perplexity"][lt]["values"], row["perplexity"][lc]["values"])]
    return stat(ratios)


def comparisons(summary: dict) -> List[dict]:
    """The differences the paper's claims are about (docs/reference.md, "Paper results"): PoSE
    against full-length training, RandPos and PI-only at L_t; PI-only against PoSE-Linear at L_c;
    the added setting against its method's main runs at L_c and L_t."""
    rows, s = summary["rows"], summary["settings"]
    lc, lt = str(s["seq_length"]), str(s["target_length"])
    out = []
    for metric in ("perplexity", "passkey"):
        for pose in POSE_ROWS:
            out += [difference(rows, pose, full, metric, lt) for full in ("full-length", "full-length-equal-tokens")]
            out += [difference(rows, "randpos", pose, metric, lt), difference(rows, pose, "pi-only", metric, lt)]
        out.append(difference(rows, "pi-only", "pose-linear", metric, lc))
        for key, row in rows.items():  # the added setting against the same method's main runs
            if row["setting"] != "main":
                out += [difference(rows, key, row["method"], metric, n) for n in (lc, lt)]
    return [c for c in out if c is not None]
