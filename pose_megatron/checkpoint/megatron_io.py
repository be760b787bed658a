"""Model weights in megatron-core dist checkpoints (torch_dist), in Megatron-LM's directory layout.

The sharded state dict is `{"model": model.sharded_state_dict(), ...}`: tensors are stored with their
global shapes and layer numbers, so weights load at any TP / PP. The trainer adds optimizer,
scheduler and RNG entries to the same dict; the tools here read only "model". Every save also
carries what stock Megatron-LM reads from the common state: `checkpoint_version` 3.0, `iteration`
and an `args` namespace in its argument names (checkpoint/megatron_args.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Union

import torch.distributed as dist
from megatron.core import dist_checkpointing

from pose_megatron.checkpoint.layout import (
    RELEASE,
    Iteration,
    RunConfig,
    iteration_dirname,
    load_run_config,
    resolve_checkpoint_dir,
    save_run_config,
    write_tracker,
)
from pose_megatron.checkpoint.megatron_args import log_stock_rope, megatron_args, sharded_sd_metadata
from pose_megatron.checkpoint.saved_state import CHECKPOINT_VERSION
from pose_megatron.files import atomic_directory, incomplete_name
from pose_megatron.runtime import is_first_rank, parallel_layout


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_sharded(
    root: Union[str, Path],
    iteration: Iteration,
    sharded_state_dict: dict,
    run_config: RunConfig,
    *,
    args: Optional[argparse.Namespace] = None,
    content_metadata: Optional[dict] = None,
) -> Path:
    """Save a sharded state dict as ROOT/iter_XXXXXXX, atomically; collective over all ranks.

    Every rank writes into the first rank's temporary directory (files.atomic_directory); it is
    renamed and made the latest only once every rank has finished, so an interrupted save never
    shadows the previous checkpoint. `args` (default: those of a weights-only checkpoint at the
    current layout) and `content_metadata` go to the common state, as Megatron-LM saves them.
    """
    root = Path(root)
    final = root / iteration_dirname(iteration)
    step = 0 if iteration == RELEASE else int(iteration)
    if args is None:
        args = megatron_args(run_config, parallel_layout(), iteration=step)
    sharded_state_dict = dict(sharded_state_dict, args=args, checkpoint_version=CHECKPOINT_VERSION,
                              iteration=step)

    def write_into(tmp: Path) -> None:
        _barrier()  # the first rank has created tmp
        dist_checkpointing.save(sharded_state_dict, str(tmp), content_metadata=content_metadata)
        _barrier()  # every rank has written its part
        if is_first_rank():
            save_run_config(tmp, run_config)

    if is_first_rank():
        root.mkdir(parents=True, exist_ok=True)
        with atomic_directory(final, replace=True) as tmp:
            write_into(tmp)
        write_tracker(root, iteration)
        log_stock_rope(run_config, final)
    else:
        write_into(incomplete_name(final))
    _barrier()
    return final


def load_model_weights(path: Union[str, Path], model) -> Optional[RunConfig]:
    """Load the "model" entry of a checkpoint into `model` (any TP / PP); collective.

    `path` is a save root (its latest iteration is used) or an iteration directory. Returns the
    stored RunConfig (None if the checkpoint has none).
    """
    ckpt = resolve_checkpoint_dir(path)
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt))
    model.load_state_dict(state["model"])
    return load_run_config(ckpt)


def save_model_weights(root: Union[str, Path], iteration: Iteration, model, run_config: RunConfig) -> Path:
    """Save only the model's weights (e.g. an export or a converted checkpoint); collective."""
    return save_sharded(root, iteration, {"model": model.sharded_state_dict()}, run_config,
                        content_metadata=sharded_sd_metadata(use_distributed_optimizer=False))
