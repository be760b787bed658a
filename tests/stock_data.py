"""The checkpoint stock Megatron-LM wrote (tests/data/stock_megatron_lm, made by
scripts/stock_megatron_lm/make_test_checkpoint.py) and data that replays its fixed batch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy

STOCK_DIR = Path(__file__).resolve().parent / "data" / "stock_megatron_lm"
STOCK_CHECKPOINT = STOCK_DIR / "checkpoint"
STOCK_RECORD = json.loads((STOCK_DIR / "stock_loss.json").read_text())
VOCAB = 128  # NullTokenizer: 127 tokens + EOD


def write_tokenizer(directory: Path, size: int = VOCAB) -> str:
    """A Hugging Face word-level tokenizer with the stock run's 128 ids (EOD = the last)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(size - 1)}
    vocab["</s>"] = size - 1
    backend = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>").save_pretrained(directory)
    return str(directory)


def write_fixed_batch(prefix: Path) -> str:
    """An indexed dataset of the fixed batch's rows, one 65-token document each: with target length
    = window and micro-batch 2, every micro-batch is exactly that batch (in some row order)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.uint16)
    for row in STOCK_RECORD["fixed_batch"]["rows"]:
        builder.add_document(numpy.asarray(row, dtype=numpy.uint16), [len(row)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)
