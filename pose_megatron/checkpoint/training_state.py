"""Full training checkpoints: model, optimizer, LR schedule, RNG, iteration and consumed samples.

One dist checkpoint per save (see megatron_io.save_sharded for the atomic write):
    {"model": ..., "optimizer": ..., "opt_param_scheduler": {...}, "iteration": k,
     "consumed_train_samples": n, "parallel": {"tp", "pp", "dp"}, "rng_state": per-rank object}
Model weights reshard to any TP / PP on load. Optimizer state (and RNG) reload only at the layout
they were saved with; at another layout, pass --no-load-optim (fresh optimizer, schedule and
iteration kept) or --finetune (weights only), and the run says so.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from pose_megatron.checkpoint.layout import RunConfig, holds_checkpoint, resolve_checkpoint_dir
from pose_megatron.checkpoint.megatron_io import load_model_weights, save_sharded

logger = logging.getLogger(__name__)

# The distributed optimizer's format that dist_checkpointing saves and loads on CPU and GPU alike.
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


@dataclass
class TrainingProgress:
    """Where a run stands; restored exactly on resume."""

    iteration: int = 0
    """Optimizer steps taken."""
    consumed_train_samples: int = 0
    """Training samples consumed (the data position to resume from)."""


def _layout() -> dict:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def _rng_object(data: Optional[dict]) -> ShardedObject:
    layout = _layout()
    return ShardedObject(
        "rng_state",
        data,
        (layout["pp"], layout["tp"], layout["dp"]),
        (
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_data_parallel_rank(),
        ),
        replica_id=0,
    )


def _capture_rng() -> dict:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _state_dict(model, optimizer, scheduler, progress, rng, is_loading: bool) -> dict:
    model_sd = model.sharded_state_dict()
    state = {"model": model_sd, "parallel": _layout(), "rng_state": _rng_object(rng)}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=_OPTIMIZER_METADATA
        )
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    state["iteration"] = progress.iteration
    state["consumed_train_samples"] = progress.consumed_train_samples
    return state


def save_training_checkpoint(root, model, optimizer, scheduler, progress: TrainingProgress,
                             run_config: RunConfig):
    """Write ROOT/iter_XXXXXXX for this step (collective); the previous one stays valid until done."""
    state = _state_dict(model, optimizer, scheduler, progress, _capture_rng(), is_loading=False)
    return save_sharded(root, progress.iteration, state, run_config)


def load_training_checkpoint(load, model, optimizer, scheduler, *, finetune: bool = False,
                             no_load_optim: bool = False) -> Optional[TrainingProgress]:
    """Restore a run from `load` (collective). None when `load` holds no checkpoint yet.

    finetune: weights only (progress starts at zero). no_load_optim: weights, schedule, progress.
    """
    if not holds_checkpoint(load):
        logger.warning("no checkpoint under %s; starting from scratch", load)
        return None
    ckpt = resolve_checkpoint_dir(load)
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    saved_layout = common.get("parallel")
    same_layout = saved_layout == _layout()
    if finetune or "iteration" not in common:  # a converted checkpoint holds weights only
        load_model_weights(ckpt, model)
        logger.info("loaded weights from %s (fine-tuning: fresh optimizer and schedule)", ckpt)
        return TrainingProgress()
    load_optim = optimizer is not None and not no_load_optim
    if load_optim and not same_layout:
        raise RuntimeError(
            f"{ckpt} was saved at TP={saved_layout['tp']} PP={saved_layout['pp']} "
            f"DP={saved_layout['dp']}; this run is TP={_layout()['tp']} PP={_layout()['pp']} "
            f"DP={_layout()['dp']}. Optimizer state reloads only at the layout it was saved with: "
            "resume at that layout, or pass --no-load-optim (fresh optimizer state, schedule and "
            "iteration kept) or --finetune (weights only)."
        )
    template = _state_dict(model, optimizer if load_optim else None, None,
                           TrainingProgress(), None, is_loading=True)
    if not same_layout:
        del template["rng_state"]
    state = dist_checkpointing.load(template, str(ckpt))
    model.load_state_dict(state["model"])
    if load_optim:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and "opt_param_scheduler" in common:
        scheduler.load_state_dict(common["opt_param_scheduler"])
    if same_layout and state.get("rng_state") is not None:
        _restore_rng(state["rng_state"])
    progress = TrainingProgress(common["iteration"], common["consumed_train_samples"])
    logger.info("resumed from %s at iteration %d (%d samples consumed)%s", ckpt,
                progress.iteration, progress.consumed_train_samples,
                "" if load_optim else "; optimizer state not loaded")
    return progress
