#!/usr/bin/env python3
"""Sliding-window perplexity of Megatron and Hugging Face checkpoints (the PoSE paper's protocol).

    python tools/eval_perplexity.py --load runs/pose-16k --label pose-16k \
        --hf-dir models/llama-7b --label llama-7b \
        --data-path data/pg19_text_document --tokenizer-model tokenizer.model \
        --lengths 2k,4k,8k,16k --stride 1024 --num-docs 50 --output results/ppl.json
    torchrun --nproc-per-node 8 tools/eval_perplexity.py --load ... --tensor-model-parallel-size 4 ...

Writes results/ppl.json and results/ppl.png and prints a table. The logic lives in
pose_megatron.evaluation.
"""

import logging
import sys

from pose_megatron.evaluation import cli
from pose_megatron.evaluation.documents import load_documents
from pose_megatron.evaluation.perplexity import evaluate_perplexity
from pose_megatron.evaluation.report import (figure_path, perplexity_table, plot_perplexity, results_to_json,
                                             write_json)
from pose_megatron.runtime import is_first_rank

logger = logging.getLogger("eval_perplexity")


def parse_args(argv=None):
    parser = cli.tool_parser(
        "Sliding-window perplexity: each window is BOS + up to W-1 tokens; the first "
        "window scores all its tokens, later ones (every --stride tokens) only new ones.",
    )
    parser.add_argument("--data-path", required=True, metavar="PREFIX|FILE.jsonl",
                        help="a .bin/.idx prefix from tools/preprocess_data.py, or a JSONL file")
    parser.add_argument("--json-key", default="text", help="text field of JSONL records")
    parser.add_argument("--stride", type=int, default=None,
                        help="tokens between window starts (default and maximum: W-1, no overlap)")
    parser.add_argument("--num-docs", type=int, default=50, help="documents to evaluate (the paper: 50)")
    parser.add_argument("--min-doc-tokens", type=int, default=None,
                        help="skip shorter documents (default: the longest --lengths)")
    parser.add_argument("--truncate", action="store_true", help="one window per document")
    parser.add_argument("--bos-id", type=int, default=None, help="BOS id (default: the tokenizer's)")
    args = cli.parse_tool_args(parser, argv)
    if args.stride is not None and args.stride < 1:
        parser.error("--stride must be >= 1")
    return args


def main(argv=None) -> int:
    return cli.run_tool(parse_args, evaluate, argv)


def evaluate(args) -> int:
    tokenizer = cli.resolve_tokenizer(args, args.checkpoints)
    bos = args.bos_id if args.bos_id is not None else (tokenizer.bos if tokenizer else None)
    if bos is None:
        raise ValueError("the protocol starts every window with BOS: pass --tokenizer-model "
                         "(a tokenizer with a BOS token) or --bos-id")
    # Data first: a corpus without usable documents fails before any model is loaded.
    docs = load_documents(
        args.data_path, min_tokens=args.min_doc_tokens or max(args.lengths),
        num_docs=args.num_docs, tokenizer=tokenizer, bos=bos, json_key=args.json_key,
    )
    logger.info("%d documents (%d tokens); %d shorter than %d tokens skipped",
                len(docs.documents), docs.num_tokens, docs.skipped, docs.min_tokens)

    def score(backend) -> dict:
        per_length = evaluate_perplexity(backend, docs.documents, args.lengths, bos=bos, stride=args.stride,
                                         truncate=args.truncate, progress=not args.no_progress)
        return {r.length: r.to_json() for r in per_length}

    results, described = cli.evaluate_checkpoints(args, score, max_token=docs.max_token)
    if not is_first_rank():
        return 0
    payload = {
        "task": "perplexity",
        "protocol": {"lengths": args.lengths, "stride": args.stride, "truncate": args.truncate,
                     "bos_id": bos},
        "data": docs.summary(),
        "checkpoints": described,
        "results": results_to_json(results),
    }
    write_json(args.output, payload)
    print(perplexity_table(results, args.lengths))
    print(f"wrote {args.output}")
    if not args.no_plot and plot_perplexity(results, figure_path(args.output)):
        print(f"wrote {figure_path(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
