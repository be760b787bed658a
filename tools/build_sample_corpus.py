#!/usr/bin/env python3
"""Build (or reuse) the bundled sample corpus: Python's standard library as training documents.

    python tools/build_sample_corpus.py [--cache-dir DIR] [--force]

prints the paths to pass on: --data-path <train_prefix> --tokenizer-model <tokenizer_model>.
The logic lives in pose_megatron.corpus.
"""

import argparse
import dataclasses
import json
import logging
import sys

from pose_megatron.corpus import (
    SampleCorpus,
    SampleCorpusSettings,
    default_cache_dir,
    ensure_sample_corpus,
)


def parse_args(argv=None) -> argparse.Namespace:
    defaults = SampleCorpusSettings()
    parser = argparse.ArgumentParser(
        description="Build the sample corpus (stdlib .py sources, sentencepiece, .bin/.idx).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--cache-dir", default=None, help=f"where to build (default {default_cache_dir()})"
    )
    parser.add_argument(
        "--vocab-size", type=int, default=defaults.vocab_size, help="tokenizer vocabulary"
    )
    parser.add_argument(
        "--heldout-percent",
        type=int,
        default=defaults.heldout_percent,
        help="validation share of files",
    )
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes")
    parser.add_argument(
        "--force", action="store_true", help="rebuild even when the cache is complete"
    )
    parser.add_argument("--json", action="store_true", help="print the paths as JSON")
    parser.add_argument("--print", dest="fields", nargs="+", metavar="FIELD",
                        choices=[f.name for f in dataclasses.fields(SampleCorpus)],
                        help="print only these fields, one per line (for scripts), e.g. "
                             "--print train_prefix tokenizer_model")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(  # logs go to stderr, so --print output stays clean
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its import-time INFO is noise here
    if args.vocab_size < 300 or not 0 < args.heldout_percent < 100:
        print("error: --vocab-size must be >= 300 and --heldout-percent in 1..99", file=sys.stderr)
        return 1
    settings = dataclasses.replace(
        SampleCorpusSettings(), vocab_size=args.vocab_size, heldout_percent=args.heldout_percent
    )
    corpus = ensure_sample_corpus(args.cache_dir, settings, workers=args.workers, force=args.force)
    if args.fields:
        for name in args.fields:
            print(getattr(corpus, name))
    elif args.json:
        print(json.dumps(dataclasses.asdict(corpus), indent=2))
    else:
        for name, value in dataclasses.asdict(corpus).items():
            print(f"{name:16s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
