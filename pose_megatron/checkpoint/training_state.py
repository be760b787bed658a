"""Full training checkpoints: model, optimizer, LR schedule, RNG, iteration and consumed samples.

One dist checkpoint per save (see megatron_io.save_sharded for the atomic write), in the keys and
layout stock Megatron-LM saves (docs/reference.md, "Megatron-LM checkpoints"), so either trainer
resumes the other's checkpoints:
    common.pt  {"args": Megatron-LM's namespace (consumed_train_samples, layout, ...),
                "checkpoint_version": 3.0, "iteration": k, "optimizer": ..., "content_metadata": ...,
                "opt_param_scheduler": {... counted in samples}}
    sharded    model tensors, optimizer state, "rng_state" (one object per (pp, tp) rank)
Model weights reshard to any TP / PP on load. Optimizer state reloads only at the layout it was
saved with; what cannot be restored is refused before training with the flag to pass
(resume_checks.plan_resume). Loaded without optimizer state, the weights are copied into the
optimizer's fp32 main params (bf16 / fp16), which were built from the random initialisation, as
Megatron-LM's loader does.
"""

from __future__ import annotations

import logging
import random
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from pose_megatron.checkpoint.layout import RunConfig, holds_checkpoint, resolve_checkpoint_dir
from pose_megatron.checkpoint.megatron_args import megatron_args, sharded_sd_metadata
from pose_megatron.checkpoint.megatron_io import load_model_weights, save_sharded
from pose_megatron.checkpoint.optimizer_state import (
    materialise_distributed_adam_state,
    pair_param_groups_with_saved,
    set_schedule_bounds,
    restore_adam_steps,
)
from pose_megatron.checkpoint.resume_checks import LoadOptions, plan_resume
from pose_megatron.checkpoint.saved_state import SavedState, read_saved_state
from pose_megatron.runtime import parallel_layout

logger = logging.getLogger(__name__)


@dataclass
class TrainingProgress:
    """Where a run stands; restored exactly on resume."""

    iteration: int = 0
    """Optimizer steps taken."""
    consumed_train_samples: int = 0
    """Training samples consumed (the data position to resume from)."""


def _rng_object(state, earlier_format: bool = False) -> ShardedObject:
    """Megatron-LM's RNG object: one list [state] per (pp, tp) rank, written by the first DP rank
    (the earlier format: one dict per (pp, tp, dp) rank)."""
    pp, tp, dp = (parallel_state.get_pipeline_model_parallel_rank(),
                  parallel_state.get_tensor_model_parallel_rank(),
                  parallel_state.get_data_parallel_rank())
    tp_size, pp_size, dp_size = parallel_layout()
    if earlier_format:
        return ShardedObject("rng_state", state, (pp_size, tp_size, dp_size), (pp, tp, dp), replica_id=0)
    return ShardedObject("rng_state", state, (pp_size, tp_size), (pp, tp), replica_id=dp)


def _capture_rng() -> list:
    """Megatron-LM's keys. Without CUDA there is no CUDA generator: `cuda_rng_state` is left out,
    so stock Megatron-LM asks for --no-load-rng instead of setting a CUDA generator from a CPU
    state (the tracker's states are CPU generator states then)."""
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return [state]


def _megatron_rng(saved) -> dict:
    """Either format as Megatron-LM's dict (the earlier one used short keys)."""
    if isinstance(saved, list):
        return saved[0]
    return {"random_rng_state": saved["random"], "np_rng_state": saved["numpy"],
            "torch_rng_state": saved["torch"], "rng_tracker_states": saved["tracker"],
            **({"cuda_rng_state": saved["cuda"]} if "cuda" in saved else {})}


def _check_generator_states(state: dict, where: str) -> None:
    """States made on another kind of device do not fit this one's generators (a CUDA generator
    state is a seed and an offset; a CPU one is the whole Mersenne twister)."""
    current = tensor_parallel.get_cuda_rng_tracker().get_states()
    saved = state["rng_tracker_states"]
    on_gpu = torch.cuda.is_available()
    mismatch = set(saved) != set(current) or any(saved[k].numel() != current[k].numel() for k in saved)
    if on_gpu:
        cuda = state.get("cuda_rng_state")
        mismatch = mismatch or cuda is None or cuda.numel() != torch.cuda.get_rng_state().numel()
    if mismatch:
        made = "on a machine without CUDA" if on_gpu else "with CUDA (or another RNG tracker)"
        raise ValueError(f"the RNG state of {where} was made {made} and does not fit this "
                         "machine's generators; pass --no-load-rng to resume without it")


def _restore_rng(state: dict) -> None:
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])


def save_training_checkpoint(root, model, optimizer, scheduler, progress: TrainingProgress,
                             run_config: RunConfig, *, training_args: Optional[dict] = None,
                             use_distributed_optimizer: bool = False):
    """Write ROOT/iter_XXXXXXX for this step (collective); the previous one stays valid until done.

    `training_args`: the run's own fields for `args`, in Megatron-LM's names (megatron_args)."""
    metadata = sharded_sd_metadata(use_distributed_optimizer)
    model_sd = model.sharded_state_dict(metadata=metadata)
    state = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=metadata),
        "opt_param_scheduler": scheduler.state_dict(),
        "rng_state": _rng_object(_capture_rng()),
    }
    args = megatron_args(run_config, parallel_layout(), iteration=progress.iteration,
                         consumed_train_samples=progress.consumed_train_samples,
                         params_dtype=model.config.params_dtype, training=training_args)
    return save_sharded(root, progress.iteration, state, run_config, args=args,
                        content_metadata=metadata)


def _content_metadata(saved: SavedState) -> dict:
    """The metadata the checkpoint's sharded state dict was built with (Megatron-LM's reading)."""
    metadata = dict(saved.content_metadata or {})
    if saved.sharding_type is not None:
        metadata.setdefault("distrib_optim_sharding_type", saved.sharding_type)
    return metadata


def load_training_checkpoint(load, model, optimizer, scheduler,
                             options: LoadOptions) -> Optional[TrainingProgress]:
    """Restore a run from `load` (collective). None when `load` holds no checkpoint yet.

    A converted (release) checkpoint or `options.finetune` loads the weights only."""
    if not holds_checkpoint(load):
        logger.warning("no checkpoint under %s; starting from scratch", load)
        return None
    ckpt = resolve_checkpoint_dir(load)
    saved = read_saved_state(ckpt)
    if options.finetune or saved.release:
        load_model_weights(ckpt, model)
        optimizer.reload_model_params()  # bf16 / fp16: the fp32 main params were the random init
        logger.info("loaded weights from %s (fine-tuning: fresh optimizer and schedule)", ckpt)
        return TrainingProgress()
    plan = plan_resume(saved, parallel_layout(), options)
    metadata = _content_metadata(saved)
    model_sd = model.sharded_state_dict(metadata=metadata)
    template = {"model": model_sd}
    if plan.load_optimizer:
        # The template is built from the optimizer's own state, which torch's AdamW creates only
        # at its first step.
        materialise_distributed_adam_state(optimizer)
        template["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                             metadata=metadata)
    if plan.load_rng:
        template["rng_state"] = _rng_object(None, earlier_format=saved.earlier_format)
    # fp32 distributed-optimizer main params are views of the model's parameters, which need grad:
    # the state is copied into them in place.
    with torch.no_grad() if plan.load_optimizer else nullcontext():
        state = dist_checkpointing.load(template, str(ckpt))
        model.load_state_dict(state["model"])
        if plan.load_optimizer:
            pair_param_groups_with_saved(optimizer, saved.common.get("opt_param_scheduler") or {})
            optimizer.load_state_dict(state["optimizer"])
            restore_adam_steps(optimizer, state["optimizer"])
        else:
            optimizer.reload_model_params()  # as above: main params from the loaded weights
    progress = TrainingProgress(saved.iteration, saved.consumed_train_samples)
    if plan.schedule is not None:
        scheduler.load_state_dict(plan.schedule)
    else:
        scheduler.step(increment=progress.iteration * options.global_batch_size)
    set_schedule_bounds(optimizer, scheduler)
    if plan.load_rng:
        rng = _megatron_rng(state["rng_state"])
        _check_generator_states(rng, str(ckpt))
        _restore_rng(rng)
    for note in plan.notes:
        logger.info("%s: %s", ckpt, note)
    logger.info("resumed from %s (%s) at iteration %d (%d samples consumed)%s", ckpt,
                saved.written_by, progress.iteration, progress.consumed_train_samples,
                "" if plan.load_optimizer else "; optimizer state not loaded")
    return progress
