"""The small reproduction's report: summary.json, the Markdown tables and the figure.

Everything is computed from the evaluation tools' JSON outputs and the driver's stage records (the
training cost read from the trainer's --metrics-file), so the report can be redone without
re-running anything.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional

from experiments.pose_small.settings import Settings
from pose_megatron.evaluation.report import load_pyplot

LABELS = {"base": "No fine-tuning (base)", "pose-linear": "PoSE-Linear", "pose-ntk": "PoSE-NTK",
          "pose-yarn-revised": "PoSE-YaRN (revised)", "full-length": "Full-length", "pi-only": "PI-only",
          "randpos": "RandPos"}


def build_summary(s: Settings, state: dict, labels: List[str], results: dict) -> dict:
    """Everything the tables and the figure show, in one JSON-able dict: `state` is the driver's
    record of its stages, `labels` the evaluated checkpoints in order, `results` the evaluation
    tools' JSON outputs by task."""
    ppl, passkey = results["perplexity"]["results"], results["passkey"]["results"]
    models = {}
    for label in labels:
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
    plt = load_pyplot()
    if plt is None:
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
