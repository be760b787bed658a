#!/usr/bin/env python3
"""Tokenize a JSONL corpus into megatron-core .bin/.idx files.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type sentencepiece --tokenizer-model tokenizer.model --append-eod --workers 4

writes data/corpus_text_document.{bin,idx}; pass data/corpus_text_document to --data-path.
The logic lives in pose_megatron.preprocess.
"""

import argparse
import logging
import sys

from pose_megatron.preprocess import MalformedLineError, PreprocessConfig, preprocess_jsonl
from pose_megatron.tokenizer import TOKENIZER_TYPES


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Tokenize a JSONL file (one document per line) into .bin/.idx files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--input", required=True, help="the .jsonl file")
    parser.add_argument(
        "--output-prefix",
        required=True,
        help="output prefix; each json key writes PREFIX_<key>_document.{bin,idx}",
    )
    parser.add_argument("--tokenizer-type", required=True, help=f"one of {sorted(TOKENIZER_TYPES)}")
    parser.add_argument(
        "--tokenizer-model",
        required=True,
        help="sentencepiece .model file, or Hugging Face tokenizer directory",
    )
    parser.add_argument(
        "--json-keys", nargs="+", default=["text"], help="keys whose text is tokenized"
    )
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--prepend-bos", action="store_true", help="put BOS before each document")
    parser.add_argument("--append-eod", action="store_true", help="put EOD after each document")
    parser.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="skip and count malformed lines instead of stopping at the first one",
    )
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing output files of the same prefix")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # megatron-core logs its import-time setup at INFO; only its warnings matter here.
    logging.getLogger("megatron").setLevel(max(logging.WARNING, logging.root.level))
    config = PreprocessConfig(
        input=args.input,
        output_prefix=args.output_prefix,
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        json_keys=tuple(args.json_keys),
        workers=args.workers,
        prepend_bos=args.prepend_bos,
        append_eod=args.append_eod,
        skip_bad_lines=args.skip_bad_lines,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    try:
        stats = preprocess_jsonl(config)
    except (MalformedLineError, ValueError, OSError) as error:  # OSError: missing / unwritable paths
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"wrote {stats.documents} documents, {stats.tokens} tokens "
        f"({stats.bad_lines} malformed lines skipped, {stats.empty_documents} empty documents "
        f"skipped) in {stats.seconds:.1f} s"
    )
    for key, prefix in stats.output_prefixes.items():
        print(f"  {key}: --data-path {prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
