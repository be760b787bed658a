"""Evaluation reports: JSON files, printed tables and PNG figures.

Inputs are plain dicts keyed by checkpoint label (insertion order is table and legend order), so the
tools, the experiment scripts and the tests can all feed them. matplotlib is optional: without it the
figures are skipped with a warning and everything else is still written.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Dict, List, Mapping, Optional, Sequence

from pose_megatron.files import atomic_write_text

logger = logging.getLogger(__name__)


def write_json(path: str, payload: dict) -> None:
    """Write JSON atomically (readers never see half a file), creating its directory."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def figure_path(output_json: str, suffix: str = "") -> str:
    """FILE.json -> FILE<suffix>.png."""
    stem = output_json[:-5] if output_json.endswith(".json") else output_json
    return f"{stem}{suffix}.png"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (readable as plain text too) with right-aligned value columns."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]

    def line(cells):
        parts = [str(c).ljust(widths[0]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(cells)]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule] + [line(r) for r in rows])


def _format_ppl(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "inf"
    return f"{value:.3f}" if value < 1000 else f"{value:.3g}"


def perplexity_table(results: Mapping[str, Mapping[int, dict]], lengths: Sequence[int]) -> str:
    """Rows: checkpoints; columns: window lengths; cells: perplexity (* = beyond the model's
    positions)."""
    rows = []
    for label, by_length in results.items():
        row = [label]
        for length in lengths:
            r = by_length.get(length)
            cell = _format_ppl(r["perplexity"] if r else None)
            if r and r.get("extrapolated"):
                cell += "*"
            row.append(cell)
        rows.append(row)
    table = format_table(["checkpoint"] + [str(n) for n in lengths], rows)
    if any(r.get("extrapolated") for by_length in results.values() for r in by_length.values()):
        table += "\n* beyond the model's trained positions (extrapolation)"
    return table


def passkey_table(summaries: Mapping[str, Mapping[int, dict]], lengths: Sequence[int],
                  skipped: Optional[Mapping[int, int]] = None) -> str:
    """Rows: checkpoints; columns: lengths; cells: accuracy in percent (correct / trials), and the
    trials skipped at that length when there were any (`skipped`: length -> count)."""
    rows = []
    for label, by_length in summaries.items():
        row = [label]
        for length in lengths:
            cell = by_length.get(length)
            missed = (skipped or {}).get(length, 0)
            note = f", {missed} skipped" if missed else ""
            row.append("-" if not cell else
                       f"{100 * cell['accuracy']:.0f}% ({cell['correct']}/{cell['trials']}{note})")
        rows.append(row)
    return format_table(["checkpoint"] + [str(n) for n in lengths], rows)


def load_pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed), or None with a warning
    when matplotlib is not installed (figures are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: skipping the PNG figure (pip install matplotlib)")
        return None
    return plt


def plot_perplexity(results: Mapping[str, Mapping[int, dict]], path: str, title: str = "") -> Optional[str]:
    """Perplexity against window length, log-scale y, one line per checkpoint. Returns the path
    written (None without matplotlib)."""
    plt = load_pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, by_length in results.items():
        points = sorted((n, r["perplexity"]) for n, r in by_length.items() if math.isfinite(r["perplexity"]))
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    lengths = sorted({n for by_length in results.values() for n in by_length})
    ax.set_xticks(lengths)
    ax.set_xticklabels([_short(n) for n in lengths])
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")
    values = [r["perplexity"] for by_length in results.values() for r in by_length.values()
              if math.isfinite(r["perplexity"])]
    ax.yaxis.set_major_formatter(plain)
    # Within one decade the decade ticks are too few: label the minor ticks too.
    narrow = bool(values) and max(values) / min(values) < 10
    ax.yaxis.set_minor_formatter(plain if narrow else NullFormatter())
    ax.set_xlabel("evaluation window (tokens)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title or "sliding-window perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _short(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def plot_passkey_heatmap(
    by_depth: Mapping[str, Mapping[int, Mapping[str, dict]]], path: str, title: str = ""
) -> Optional[str]:
    """Accuracy heatmaps, one panel per checkpoint: rows = depth, columns = prompt length."""
    plt = load_pyplot()
    if plt is None:
        return None
    import numpy as np

    labels = list(by_depth)
    width = 1.5 + (1.2 + 0.9 * _max_cols(by_depth)) * len(labels)
    fig, axes = plt.subplots(1, len(labels), figsize=(width, 4.2), squeeze=False, layout="constrained")
    image = None
    for ax, label in zip(axes[0], labels):
        cells = by_depth[label]
        lengths = sorted(cells)
        depths = sorted({d for per_length in cells.values() for d in per_length}, key=_depth_key)
        grid = np.full((len(depths), len(lengths)), np.nan)
        for j, length in enumerate(lengths):
            for i, depth in enumerate(depths):
                if depth in cells[length]:
                    grid[i, j] = cells[length][depth]["accuracy"]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{100 * grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)))
        ax.set_xticklabels([_short(n) for n in lengths])
        ax.set_yticks(range(len(depths)))
        ax.set_yticklabels(depths)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(label)
    axes[0][0].set_ylabel("key depth (fraction of the filler before the key)")
    fig.suptitle(title or "passkey retrieval accuracy (%)")
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), fraction=0.05, label="accuracy")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _max_cols(by_depth) -> int:
    return max((len(cells) for cells in by_depth.values()), default=1)


def _depth_key(label: str) -> float:
    return float(label.split("-")[0])


def lengths_of(results: Mapping[str, Mapping[int, dict]]) -> List[int]:
    return sorted({n for by_length in results.values() for n in by_length})


def results_to_json(results: Mapping[str, Mapping[int, dict]]) -> Dict[str, Dict[str, dict]]:
    """JSON object keys must be strings: {label: {"2048": {...}}}."""
    return {label: {str(n): r for n, r in by_length.items()} for label, by_length in results.items()}
