"""Far-token perplexity: does a model use context beyond its short window at all?

The tokens of document positions [start, end) (e.g. 1024..2047) are scored twice:
- full context: one window BOS + document[0 : end - 1], so token t sees all t earlier tokens;
- short context: windows of `short_window` tokens (BOS + short_window - 1 document tokens), each
  scoring its last `stride` tokens, so token t sees between short_window - stride and
  short_window - 1 earlier tokens.
Both score exactly the same tokens. A model that uses the long context has a lower full-context
perplexity than short-context perplexity; a model that is confused by long inputs has a higher one.

Built on the evaluation library's public API (EvalBackend.score with ScoreRequest, windows.Window);
run it like the evaluation tools (under torchrun the windows are split over data-parallel ranks):

    python -m torch.distributed.run --nproc-per-node 2 -m pose_megatron.evaluation.far_tokens \
        --load runs/base --label base --load runs/pose --label pose \
        --data-path eval_text_document synth_text_document --data-name corpus synthetic --tokenizer-model tokenizer.model --output far.json
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import asdict, dataclass
from typing import List, Sequence, Tuple

import numpy as np

from pose_megatron.evaluation import cli
from pose_megatron.evaluation.backends import EvalBackend, ScoreRequest, open_backend
from pose_megatron.evaluation.documents import load_documents
from pose_megatron.evaluation.report import write_json
from pose_megatron.evaluation.windows import Window, window_input, window_targets

logger = logging.getLogger("far_tokens")


@dataclass
class FarTokenResult:
    """Far-token perplexities of one checkpoint."""

    start: int
    end: int
    short_window: int
    stride: int
    tokens_scored: int
    documents: int
    full_nll: float
    short_nll: float

    @property
    def full_perplexity(self) -> float:
        return math.exp(self.full_nll)

    @property
    def short_perplexity(self) -> float:
        return math.exp(self.short_nll)

    def to_json(self) -> dict:
        data = asdict(self)
        data.update(full_perplexity=self.full_perplexity, short_perplexity=self.short_perplexity,
                    ratio=self.full_perplexity / self.short_perplexity)
        return data


def full_window(start: int, end: int) -> Window:
    """The one window that scores document[start:end] with all of document[0:start] as context."""
    return Window(start=0, end=end, score_from=start)


def short_windows(start: int, end: int, short_window: int, stride: int) -> List[Window]:
    """Windows of `short_window` tokens (BOS included) that together score document[start:end]
    once, each scoring at most its last `stride` tokens."""
    span = short_window - 1  # document tokens per window
    if not 1 <= stride <= span:
        raise ValueError(f"stride must be in 1..{span}, got {stride}")
    if start < span - stride:
        raise ValueError(f"start {start} leaves the first short window without full context")
    windows = []
    for score_from in range(start, end, stride):
        stop = min(score_from + stride, end)
        windows.append(Window(start=stop - span, end=stop, score_from=score_from))
    return windows


def _score_windows(backend: EvalBackend, plan: Sequence[Tuple[np.ndarray, Window]], bos: int) -> Tuple[float, int]:
    """NLL sum and count over this replica's share of `plan`, reduced over all replicas."""
    mine = plan[backend.dp_rank :: backend.dp_size]
    nll_sum, count = 0.0, 0
    for i in range(0, len(mine), backend.group_size):
        group = mine[i : i + backend.group_size]  # all windows of a plan have one length
        requests = [ScoreRequest(input_ids=window_input(doc, w, bos), targets=window_targets(doc, w),
                                 first_target=w.first_target) for doc, w in group]
        for (_, w), nll in zip(group, backend.score(requests)):
            if nll is not None:
                if len(nll) != w.num_scored:
                    raise RuntimeError(f"scored {len(nll)} tokens, expected {w.num_scored}")
                nll_sum += float(nll.sum())
                count += len(nll)
    total_sum, total_count = backend.all_reduce_sum([nll_sum, count])
    return total_sum, int(round(total_count))


def evaluate_far_tokens(backend: EvalBackend, documents: Sequence[np.ndarray], *, bos: int,
                        start: int, end: int, short_window: int, stride: int) -> FarTokenResult:
    """Full- and short-context NLL of document[start:end] over `documents` (collective)."""
    docs = [d for d in documents if len(d) >= end]
    if not docs:
        raise ValueError(f"no document has {end} tokens")
    full_plan = [(d, full_window(start, end)) for d in docs]
    short_plan = [(d, w) for d in docs for w in short_windows(start, end, short_window, stride)]
    full_sum, full_count = _score_windows(backend, full_plan, bos)
    short_sum, short_count = _score_windows(backend, short_plan, bos)
    expected = len(docs) * (end - start)
    if full_count != expected or short_count != expected:
        raise RuntimeError(f"scored {full_count} / {short_count} tokens, expected {expected}")
    return FarTokenResult(start=start, end=end, short_window=short_window, stride=stride,
                          tokens_scored=expected, documents=len(docs),
                          full_nll=full_sum / expected, short_nll=short_sum / expected)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_common_arguments(parser)
    parser.set_defaults(lengths=None)
    for action in parser._actions:
        if action.dest == "lengths":
            action.required = False
            action.help = "unused (the far-token range is --start..--end)"
    parser.add_argument("--data-path", required=True, nargs="+", metavar="PREFIX|FILE.jsonl",
                        help="one or more data sets (each evaluated separately)")
    parser.add_argument("--data-name", nargs="+", default=None,
                        help="names of the data sets in the output (default: their paths)")
    parser.add_argument("--num-docs", type=int, default=50)
    parser.add_argument("--far-start", dest="start", type=int, default=1024, help="first scored document position")
    parser.add_argument("--far-end", dest="end", type=int, default=2048, help="one past the last scored position")
    parser.add_argument("--short-window", type=int, default=256, help="short context window (BOS included)")
    parser.add_argument("--stride", type=int, default=32, help="tokens scored per short window")
    args = parser.parse_args(argv)
    args.checkpoints = cli.checkpoints_from_args(parser, args)
    args.data_name = args.data_name or list(args.data_path)
    if len(args.data_name) != len(args.data_path):
        parser.error("give one --data-name per --data-path")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cli.setup_logging(args.log_level)

    def run() -> int:
        tokenizer = cli.resolve_tokenizer(args, args.checkpoints)
        if tokenizer is None:
            raise ValueError("pass --tokenizer-model")
        data = {name: load_documents(path, min_tokens=args.end, num_docs=args.num_docs, tokenizer=tokenizer)
                for name, path in zip(args.data_name, args.data_path)}
        if cli.needs_distributed(args.checkpoints):
            from pose_megatron import runtime
            from pose_megatron._compat import enable_cpu_fallbacks

            enable_cpu_fallbacks()

            runtime.initialize_distributed()
        results = {name: {} for name in data}
        described = {}
        for spec in args.checkpoints:
            backend = open_backend(spec.kind, spec.path, spec.label, dtype=args.dtype,
                                   tensor_model_parallel_size=args.tensor_model_parallel_size,
                                   pipeline_model_parallel_size=args.pipeline_model_parallel_size)
            for name, docs in data.items():
                result = evaluate_far_tokens(backend, docs.documents, bos=tokenizer.bos, start=args.start,
                                             end=args.end, short_window=args.short_window, stride=args.stride)
                results[name][spec.label] = result.to_json()
                if backend.is_main:
                    logger.info("%s on %s: far-token ppl full %.3f vs %d-token window %.3f", spec.label, name,
                                result.full_perplexity, args.short_window, result.short_perplexity)
            described[spec.label] = backend.describe()
            backend.close()
        if not cli.is_main_process():
            return 0
        write_json(args.output, {"task": "far_tokens", "data": {n: d.summary() for n, d in data.items()},
                                 "protocol": {"start": args.start, "end": args.end,
                                              "short_window": args.short_window, "stride": args.stride},
                                 "checkpoints": described, "results": results})
        print(f"wrote {args.output}")
        return 0

    return cli.run(run)


if __name__ == "__main__":
    sys.exit(main())
