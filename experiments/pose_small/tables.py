"""The small reproduction's report.md and results.png, rendered from summary.json (summary.py).

Cells show a row's mean over its seeds +- its spread (the largest distance of a seed from the
mean); a row with one seed shows its value alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from experiments.pose_small.summary import EQUAL_TOKEN_ROWS, LABELS, MAIN_ROWS
from pose_megatron.evaluation.report import load_pyplot


def cell(x: Optional[dict], digits: int = 2, scale: float = 1.0, unit: str = "") -> str:
    if x is None:
        return "-"
    mean = scale * x["mean"]
    text = f"{mean:.{digits}f}{unit}"
    return text if x["n"] == 1 else f"{text} ± {scale * x['spread']:.{digits}f}{unit}"


def ppl(x: dict) -> str:
    """A perplexity cell; as in the paper's tables, beyond 1000 is just >1000."""
    return ">1000" if x["mean"] > 1000 else cell(x)


def row_name(r: dict, s: dict) -> str:
    """The row's method, and for the added setting its learning rate and steps."""
    if r["setting"] == "main":
        return LABELS[r["method"]]
    return f"{LABELS[r['method']]} (lr {s['fair_lr']:g}, {s['extend_iters'] * s['fair_iters_factor']} steps)"


def _span(method: str, s: dict) -> str:
    lc, lt = s["seq_length"], s["target_length"]
    return {"base": f"{lc} / {lc}", "full-length": f"{lt} / {lt}", "full-length-equal-tokens": f"{lt} / {lt}",
            "pi-only": f"{lc} / {lc} (x{lt // lc})"}.get(method, f"{lc} / {lt}")


def _table(lines: List[str], header: List[str], rows: List[List[str]]) -> None:
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("")


def quality_table(lines: List[str], summary: dict, keys: List[str]) -> None:
    s, rows = summary["settings"], summary["rows"]
    header = ["Model", "seeds", "train / target"] + [f"PPL {n}" for n in s["ppl_lengths"]]
    header += [f"passkey {n}" for n in s["passkey_lengths"]]
    header += ["far answers full / short (synthetic)", "far ratio (corpus)"]
    body = []
    for key in keys:
        if key not in rows:
            continue
        r = rows[key]
        line = [row_name(r, s), str(len(r["labels"])), _span(r["method"], s)]
        line += [ppl(r["perplexity"][str(n)]) for n in s["ppl_lengths"]]
        line += [cell(r["passkey"][str(n)], 0, 100, "%") for n in s["passkey_lengths"]]
        syn = r["far"]["synthetic"]
        line += [f"{ppl(syn['full'])} / {ppl(syn['short'])}", cell(r["far"]["corpus"]["ratio"], 3)]
        body.append(line)
    _table(lines, header, body)


def cost_table(lines: List[str], summary: dict) -> None:
    s, rows = summary["settings"], summary["rows"]
    reference = rows.get("pose-linear", {}).get("cost", {}).get("cpu_seconds")
    header = ["Method", "seeds", "train length", "steps", "sequences / step", "tokens / step", "tokens in all",
              "CPU time (s)", "CPU vs PoSE-Linear", "wall time (s)", "tokens/s", "ms/step", "peak memory (GiB)",
              "final loss"]
    body = []
    for key, r in rows.items():
        c = r.get("cost")
        if not c:
            continue
        steps, tokens = int(c["steps"]["mean"]), int(c["tokens_per_step"]["mean"])
        ratio = f"{c['cpu_seconds']['mean'] / reference['mean']:.2f}x" if reference else "-"
        body.append([row_name(r, s), str(len(r["labels"])), str(int(c["train_length"]["mean"])), str(steps),
                     str(int(c["sequences_per_step"]["mean"])), str(tokens), f"{steps * tokens:,}",
                     cell(c["cpu_seconds"], 0), ratio, cell(c["wall_seconds"], 0), cell(c["tokens_per_s"], 0),
                     cell(c["ms_per_it"], 0), cell(c["peak_mem_gib"]), cell(c["final_loss"], 3)])
    _table(lines, header, body)


def render_markdown(summary: dict) -> str:
    s, rows = summary["settings"], summary["rows"]
    far, pk = summary["far_protocol"], summary["passkey_protocol"]
    lc, lt = s["seq_length"], s["target_length"]
    lines = [f"# Tables ({s['model']} model, {lc} -> {lt}; extension seeds {s['seeds']})", "",
             f"Perplexity: {summary['ppl_data']['documents']} held-out corpus documents, stride {s['ppl_stride']}. "
             f"Passkey: {s['passkey_trials']} trials per length and seed, {pk['max_new_tokens']} greedy tokens, "
             f"{pk['fit']} ({pk['filler_sentence_tokens']} tokens). Far tokens: positions {far['start']}..{far['end'] - 1} "
             f"scored with the full context and with a {far['short_window']}-token window; synthetic: the digits of "
             f"answers whose previous key mention lies beyond that window; corpus: all tokens (ratio full / short). "
             "Cells: mean ± spread over the seeds (spread = largest distance of a seed from the mean).", "",
             f"## Same steps and sequences per step (the paper's protocol): {s['extend_iters']} steps x "
             f"{s['extend_batch']} sequences", ""]
    quality_table(lines, summary, MAIN_ROWS)
    lines += ["## Same steps and tokens per step: full-length reads "
              f"{s['extend_batch'] * lc // lt} sequences of {lt} per step (the other rows are the runs above)", ""]
    quality_table(lines, summary, EQUAL_TOKEN_ROWS)
    fair = [k for k in rows if rows[k]["setting"] == "fair"]
    if fair:
        lines += [f"## Added setting for linear interpolation: lr {s['fair_lr']:g}, {s['fair_iters_factor']}x the "
                  f"steps, seed {s['seeds'][0]} (main-setting rows repeated for comparison)", ""]
        quality_table(lines, summary, [k for f in fair for k in (rows[f]["method"], f)])
    lines += ["## Cost of the extension runs (CPU time summed over the processes, start-up included)", ""]
    cost_table(lines, summary)
    lines += [f"## Perplexity at {lt} over perplexity at {lc} (lower is flatter)", ""]
    _table(lines, ["Model", "PPL ratio"], [[row_name(r, s), cell(r["flatness"], 3)] for r in rows.values()])
    lines += ["## Differences (a - b at one length; real = larger than the two spreads together)", ""]
    _table(lines, ["a", "b", "metric", "length", "a", "b", "a - b", "spreads", "real"], [
        [c["a"], c["b"], c["metric"], str(c["length"]), f"{c['a_mean']:.3f}", f"{c['b_mean']:.3f}",
         f"{c['difference']:+.3f}", f"{c['spreads']:.3f}", "yes" if c["real"] else "no"]
        for c in summary["comparisons"]])
    stages = summary["stages"]
    lines += ["## Stages (wall and CPU seconds)", ""]
    _table(lines, ["stage", "wall (s)", "CPU (s)"], [[k, f"{v['wall_seconds']:.0f}", f"{v['cpu_seconds']:.0f}"]
                                                   for k, v in stages.items()])
    total_cpu = sum(v["cpu_seconds"] for v in stages.values())
    total_wall = sum(v["wall_seconds"] for v in stages.values())
    lines += [f"All stages: {total_cpu / 60:.1f} CPU-minutes, {total_wall / 60:.1f} wall-minutes.", ""]
    if summary["pretrain"]["validation"]:
        lines.append("Pretraining validation (held-out split of the mixture): " + ", ".join(
            f"step {v['iteration']}: ppl {v['ppl']:.2f}" for v in summary["pretrain"]["validation"]) + ".")
    skipped = {n: c for n, c in summary["checkpoints"]["base"]["passkey_skipped"].items() if c}
    lines.append(f"Passkey trials skipped (no prompt fits): {skipped or 'none'}.")
    return "\n".join(lines) + "\n"


def plot_summary(summary: dict, path: Path) -> Optional[Path]:
    """Perplexity and passkey accuracy against length, one line per row (mean, spread as bars)."""
    plt = load_pyplot()
    if plt is None:
        return None
    s, rows = summary["settings"], summary["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, r in rows.items():
        if r["setting"] != "main":
            continue
        style = {"linestyle": "--"} if r["method"] in ("base", "randpos", "pi-only") else {}
        for ax, metric, lengths, scale in ((left, "perplexity", s["ppl_lengths"], 1),
                                           (right, "passkey", s["passkey_lengths"], 100)):
            means = [scale * r[metric][str(n)]["mean"] for n in lengths]
            spreads = [scale * r[metric][str(n)]["spread"] for n in lengths]
            ax.errorbar(lengths, means, yerr=spreads, marker="o", capsize=3, label=LABELS[r["method"]], **style)
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
    fig.suptitle(f"{s['model']} model, trained at {s['seq_length']}, extended to {s['target_length']} "
                 f"(mean and spread over seeds {s['seeds']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
