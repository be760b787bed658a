#!/usr/bin/env python3
"""Far-token perplexity of Megatron and Hugging Face checkpoints: the same far tokens of each
document scored with all earlier tokens as context, and with a short window only.

    python tools/eval_far_tokens.py --load runs/base --label base --load runs/pose --label pose \
        --data-path eval_text_document synth_text_document --data-name corpus synthetic \
        --tokenizer-model tokenizer.model --far-start 1024 --far-end 2048 --output far.json
    torchrun --nproc-per-node 2 tools/eval_far_tokens.py ...   # windows split over the ranks

    python tools/eval_far_tokens.py ... --score-spans synthetic=synth_answers.jsonl   # answer tokens only

Writes far.json (per data set and checkpoint: both perplexities and their ratio). --score-spans
NAME=FILE scores only the tokens FILE marks in data set NAME (one JSON line per source document,
{"spans": [[first, end], ...]} in token positions after BOS). The logic lives in
pose_megatron.evaluation.far_tokens.
"""

import logging
import os
import sys

from pose_megatron.evaluation import cli
from pose_megatron.evaluation.documents import load_documents
from pose_megatron.evaluation.far_tokens import evaluate_far_tokens, masks_from_spans, read_score_spans
from pose_megatron.evaluation.report import write_json
from pose_megatron.runtime import is_first_rank

logger = logging.getLogger("eval_far_tokens")


def parse_args(argv=None):
    parser = cli.tool_parser(
        "Far-token perplexity: document positions --far-start..--far-end scored with "
        "full context and with a --short-window context (a model that uses long context scores "
        "them better with full context).",
        with_lengths=False,
    )
    parser.add_argument("--data-path", required=True, nargs="+", metavar="PREFIX|FILE.jsonl",
                        help="one or more data sets (each evaluated separately)")
    parser.add_argument("--data-name", nargs="+", default=None,
                        help="names of the data sets in the output (default: their paths)")
    parser.add_argument("--num-docs", type=int, default=50, help="documents per data set")
    parser.add_argument("--far-start", dest="start", type=int, default=1024, help="first scored document position")
    parser.add_argument("--far-end", dest="end", type=int, default=2048, help="one past the last scored position")
    parser.add_argument("--short-window", type=int, default=256, help="short context window (BOS included)")
    parser.add_argument("--stride", type=int, default=32, help="tokens scored per short window")
    parser.add_argument("--score-spans", action="append", default=[], metavar="NAME=FILE.jsonl",
                        help="score only the tokens FILE marks in data set NAME (repeatable; data sets "
                             "not named are scored on every token)")
    args = cli.parse_tool_args(parser, argv)
    args.data_name = args.data_name or list(args.data_path)
    if len(args.data_name) != len(args.data_path):
        parser.error("give one --data-name per --data-path")
    args.score_spans = dict(_name_and_file(parser, item, args.data_name) for item in args.score_spans)
    if not 0 <= args.start < args.end:
        parser.error(f"need 0 <= --far-start < --far-end, got {args.start} and {args.end}")
    return args


def _name_and_file(parser, item: str, names):
    name, sep, path = item.partition("=")
    if not sep or not path:
        parser.error(f"--score-spans {item!r}: write NAME=FILE.jsonl")
    if name not in names:
        parser.error(f"--score-spans {item!r}: no data set is named {name!r} (names: {', '.join(names)})")
    if not os.path.isfile(path):
        parser.error(f"--score-spans {item!r}: {path} does not exist")
    return name, path


def main(argv=None) -> int:
    return cli.run_tool(parse_args, evaluate, argv)


def evaluate(args) -> int:
    tokenizer = cli.required_tokenizer(args, "far-token windows start with the tokenizer's BOS")
    # Data first: data sets without documents of --far-end tokens fail before any model is loaded.
    data = {name: load_documents(path, min_tokens=args.end, num_docs=args.num_docs, tokenizer=tokenizer)
            for name, path in zip(args.data_name, args.data_path)}
    masks = {name: masks_from_spans(read_score_spans(path), data[name], path)
             for name, path in args.score_spans.items()}

    def score(backend) -> dict:
        per_data = {}
        for name, docs in data.items():
            result = evaluate_far_tokens(backend, docs.documents, bos=tokenizer.bos, start=args.start,
                                         end=args.end, short_window=args.short_window, stride=args.stride,
                                         masks=masks.get(name))
            per_data[name] = result.to_json()
            if backend.is_main:
                logger.info("%s on %s: far-token ppl full %.3f vs %d-token window %.3f", backend.label, name,
                            result.full_perplexity, args.short_window, result.short_perplexity)
        return per_data

    scored, described = cli.evaluate_checkpoints(
        args, score, max_token=max(d.max_token for d in data.values()))
    if not is_first_rank():
        return 0
    write_json(args.output, {
        "task": "far_tokens",
        "data": {name: {**docs.summary(), "score_spans": args.score_spans.get(name)} for name, docs in data.items()},
        "protocol": {"start": args.start, "end": args.end, "short_window": args.short_window,
                     "stride": args.stride},
        "checkpoints": described,
        "results": {name: {label: per_data[name] for label, per_data in scored.items()} for name in data},
    })
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
