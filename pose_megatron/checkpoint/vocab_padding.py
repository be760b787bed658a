"""Vocabulary padding between a checkpoint and the model that loads it (a load-time check).

The vocabulary is padded to a multiple of make_vocab_size_divisible_by x TP (as Megatron does), so
a checkpoint imported or trained at one TP may hold another number of rows than the model at this
TP. megatron-core 0.16 still loads it: the embedding and output layer are `allow_shape_mismatch`
tensors, zero-initialised, and the rows both sides have are read (docs/reference.md, "megatron-core").
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Union

from torch.distributed.checkpoint import FileSystemReader

from pose_megatron.checkpoint.layout import RunConfig, resolve_checkpoint_dir
from pose_megatron.checkpoint.megatron_keys import EMBEDDING


def check_vocab_padding(run_config: RunConfig, tensor_model_parallel_size: int,
                        checkpoint: Union[str, Path, None] = None) -> int:
    """The padded vocabulary of the model at this TP size, checked against the checkpoint's.

    Loading a different padding is exact for the real vocabulary (only padding rows are dropped or
    start at zero), but it would silently zero real rows if the checkpoint had fewer rows than the
    model's vocabulary: that case raises ValueError here; a padding-only difference warns. The
    stored size is read from `checkpoint` (a save root or iteration directory; authoritative) or
    else from `run_config.extra["padded_vocab_size"]` (imports record it). Returns the model's
    padded size.
    """
    model = run_config.model
    needed = model.padded_vocab_size(tensor_model_parallel_size)
    stored = (stored_padded_vocab(checkpoint) if checkpoint is not None
              else run_config.extra.get("padded_vocab_size"))
    if stored is None or stored == needed:
        return needed
    if stored < model.vocab_size:
        raise ValueError(
            f"the checkpoint holds {stored} vocabulary rows but the model has {model.vocab_size} "
            f"tokens: megatron-core would load the {stored} rows and leave the others zero. Use the "
            "checkpoint's tokenizer (its vocab_size is in pose_config.json)."
        )
    fate = (f"rows {needed}..{stored - 1} are dropped" if stored > needed
            else f"rows {stored}..{needed - 1} start at zero")
    warnings.warn(
        f"the checkpoint's vocabulary ({model.vocab_size} tokens) is padded to {stored} rows; at "
        f"--tensor-model-parallel-size {tensor_model_parallel_size} the model pads it to {needed}. "
        f"The {model.vocab_size} real rows load exactly; padding {fate}.",
        stacklevel=2,
    )
    return needed


def stored_padded_vocab(checkpoint: Union[str, Path]) -> int:
    """Rows of the embedding stored in a dist checkpoint (from its metadata; reads no tensor)."""
    metadata = FileSystemReader(str(resolve_checkpoint_dir(checkpoint))).read_metadata()
    return int(metadata.state_dict_metadata[EMBEDDING].size[0])
