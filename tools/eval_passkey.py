#!/usr/bin/env python3
"""Passkey retrieval of Megatron and Hugging Face checkpoints (the PoSE paper's prompt and scoring).

    python tools/eval_passkey.py --load runs/pose-16k --label pose-16k \
        --hf-dir models/llama-7b --label llama-7b --tokenizer-model tokenizer.model \
        --lengths 2k,4k,8k,16k --trials 50 --output results/passkey.json
    python tools/eval_passkey.py ... --depths 0,0.25,0.5,0.75,1 --trials 10

Every checkpoint answers the same prompts (drawn from --seed). Writes results/passkey.json and the
heatmap results/passkey.png (accuracy by length and depth) and prints a table. The logic lives in
pose_megatron.evaluation.
"""

import dataclasses
import logging
import sys

from pose_megatron.evaluation import cli
from pose_megatron.evaluation.passkey import (PasskeyPromptBuilder, answer_decoder, evaluate_passkey, make_trials,
                                              outcomes_to_json, plan_prompts, summarize)
from pose_megatron.evaluation.report import figure_path, passkey_table, plot_passkey_heatmap, write_json
from pose_megatron.runtime import is_first_rank

logger = logging.getLogger("eval_passkey")


def parse_args(argv=None):
    parser = cli.tool_parser(
        "Passkey retrieval: a key hidden in filler at a given depth; greedy decoding; "
        "correct when the first integer of the answer is the key.",
    )
    parser.add_argument("--trials", type=int, default=50,
                        help="prompts per length (per length and depth with --depths)")
    parser.add_argument("--depths", type=cli.parse_depths, default=None,
                        help="comma-separated key depths in [0, 1] (default: uniform random per trial)")
    parser.add_argument("--seed", type=int, default=0, help="seed of keys and random depths")
    parser.add_argument("--max-new-tokens", type=int, default=10, help="greedy tokens per answer")
    args = cli.parse_tool_args(parser, argv)
    if args.trials < 1 or args.max_new_tokens < 1:
        parser.error("--trials and --max-new-tokens must be >= 1")
    return args


def main(argv=None) -> int:
    return cli.run_tool(parse_args, evaluate, argv)


def evaluate(args) -> int:
    tokenizer = cli.required_tokenizer(args, "passkey prompts are text")
    # Prompts first: a length no prompt fits fails before any model is loaded. Each prompt leaves
    # room for the answer, so no test reads past its length.
    trials = make_trials(args.lengths, args.trials, args.depths, args.seed)
    builder = PasskeyPromptBuilder(tokenizer, answer_tokens=args.max_new_tokens)
    plan = plan_prompts(builder, trials)
    prompts, skipped = plan.prompts, plan.skipped_by_length(args.lengths)
    logger.info("%d prompts at lengths %s (%d trials skipped: no fit)", len(prompts), args.lengths,
                len(plan.skipped))

    def answer(backend) -> tuple:
        outcomes = evaluate_passkey(backend, prompts, answer_decoder(tokenizer), max_new_tokens=args.max_new_tokens,
                                    stop_ids=(tokenizer.eod,), progress=not args.no_progress)
        return summarize(outcomes, explicit_depths=args.depths is not None, skipped=skipped), outcomes

    answered, described = cli.evaluate_checkpoints(
        args, answer, max_token=max(int(p.token_ids.max()) for p in prompts))
    if not is_first_rank():
        return 0
    summaries = {label: summary for label, (summary, _) in answered.items()}
    payload = {
        "task": "passkey",
        "protocol": {"lengths": args.lengths, "trials": args.trials, "depths": args.depths,
                     "seed": args.seed, "max_new_tokens": args.max_new_tokens,
                     "fit": "length - filler_sentence_tokens <= BOS + prompt + max_new_tokens <= length",
                     "filler_sentence_tokens": builder.sentence_tokens},
        "skipped": {"by_length": {str(n): c for n, c in skipped.items()},
                    "trials": [dataclasses.asdict(s) for s in plan.skipped]},
        "checkpoints": described,
        "results": {label: {**summary.to_json(), "trials": outcomes_to_json(outcomes)}
                    for label, (summary, outcomes) in answered.items()},
    }
    write_json(args.output, payload)
    print(passkey_table({k: s.by_length for k, s in summaries.items()}, args.lengths, skipped))
    print(f"wrote {args.output}")
    heatmap = figure_path(args.output)
    if not args.no_plot and plot_passkey_heatmap({k: s.by_depth for k, s in summaries.items()}, heatmap):
        print(f"wrote {heatmap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
