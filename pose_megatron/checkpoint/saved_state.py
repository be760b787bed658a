"""What a checkpoint holds besides its tensors, read from its common state before any process group.

A torch_dist checkpoint keeps the non-sharded part of its state dict in `common.pt`. Three writers
are told apart (docs/reference.md, "Megatron-LM checkpoints"):

- this project: `pose_config.json` and Megatron-LM's keys (`checkpoint_version` 3.0, `args`,
  `iteration`, `optimizer`, `opt_param_scheduler` counted in samples, `content_metadata`);
- this project's earlier format: `pose_config.json` but no `checkpoint_version`; the schedule counted
  in iterations, the layout under `parallel`, `consumed_train_samples` at the top level and the RNG
  as one object per (pp, tp, dp) rank;
- stock Megatron-LM: no `pose_config.json`; the architecture is in `args`.

`common.pt` is unpickled with `weights_only`: beyond builtins and tensors it may only hold the
classes megatron-core registers as safe (an args namespace, its enums), so reading a foreign
checkpoint at parse time runs no code from it.
"""

from __future__ import annotations

import argparse
import io
import pickle
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from pose_megatron.checkpoint.layout import CONFIG_FILE, RELEASE

CHECKPOINT_VERSION = 3.0
"""Megatron-LM's current `checkpoint_version` (below 2.0 it reorders QKV and needs one model chunk)."""
COMMON_FILE = "common.pt"
SCHEDULE_KEYS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style",
                 "start_wd", "end_wd", "wd_incr_steps", "wd_incr_style")
"""The schedule fields megatron-core's OptimizerParamScheduler checks against the run on load."""
SCHEDULE_STEP_KEYS = ("lr_warmup_steps", "lr_decay_steps", "wd_incr_steps")
"""The schedule fields counted in steps (samples in Megatron-LM's format, iterations in ours)."""
_STEP_KEYS = SCHEDULE_STEP_KEYS + ("num_steps",)

WRITTEN_BY_POSE = "pose_megatron"
WRITTEN_BY_EARLIER_POSE = "pose_megatron (earlier format)"
WRITTEN_BY_MEGATRON_LM = "Megatron-LM"


def read_common_state(ckpt_dir: Union[str, Path]) -> dict:
    """The common state dict of a torch_dist checkpoint directory; ValueError names what is wrong.

    Unpickled with `weights_only`, trusting what megatron-core trusts: importing it registers its
    safe classes (megatron/core/safe_globals.py: argparse.Namespace, its enums, numpy arrays, ...),
    the same list its own loader relies on."""
    import megatron.core  # noqa: F401  (registers megatron-core's safe globals with torch)

    path = Path(ckpt_dir) / COMMON_FILE
    try:
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
        elif (key := _common_state_key(Path(ckpt_dir))) is not None:
            state = _load_common_state_item(Path(ckpt_dir), key)
        else:
            raise ValueError(f"{ckpt_dir} holds no {COMMON_FILE} and no common_state item: the checkpoint "
                             "is incomplete (a torch_dist checkpoint keeps its iteration, arguments and "
                             "schedule there)")
    except pickle.UnpicklingError as err:
        unsupported = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line]
        raise ValueError(f"{path} pickles objects that neither torch nor megatron-core marks safe "
                         f"({unsupported[0] if unsupported else 'see torch.load'}); pose_megatron "
                         "reads what megatron-core itself loads") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def _common_state_key(ckpt_dir: Path) -> Optional[str]:
    """The DCP key of the "common_state" item, where megatron-core 0.19 and later keep the common
    state instead of common.pt (docs/reference.md, "megatron-core"); None when there is none."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (ckpt_dir / ".metadata").is_file():
        return None
    saved = FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata
    return next((key for key in saved if key.split("/")[0] == "common_state"), None)


def _load_common_state_item(ckpt_dir: Path, key: str) -> dict:
    """The item's bytes are torch.save([common state]) (one shard); read without a process group,
    and unpickled with `weights_only` like common.pt (DCP's default planner would unpickle it fully)."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    raw = {}

    class _RawBytes(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            raw[read_item.dest_index.fqn] = value.read()

    load({key: io.BytesIO()}, storage_reader=FileSystemReader(str(ckpt_dir)), planner=_RawBytes(), no_dist=True)
    shards = torch.load(io.BytesIO(raw[key]), map_location="cpu", weights_only=True)
    return shards[0] if isinstance(shards, list) and len(shards) == 1 else shards

@dataclass
class SavedState:
    """A checkpoint directory's common state and what it says about the run that wrote it."""

    directory: Path
    common: dict
    has_run_config: bool
    """Whether the directory holds a pose_config.json (this project wrote it)."""

    @property
    def release(self) -> bool:
        """A converted checkpoint (weights only; Megatron-LM starts it at iteration 0)."""
        return self.directory.name == RELEASE

    @property
    def version(self) -> float:
        return float(self.common.get("checkpoint_version", 0))

    @property
    def written_by(self) -> str:
        if not self.has_run_config:
            return WRITTEN_BY_MEGATRON_LM
        return WRITTEN_BY_EARLIER_POSE if "checkpoint_version" not in self.common else WRITTEN_BY_POSE

    @property
    def earlier_format(self) -> bool:
        return self.written_by == WRITTEN_BY_EARLIER_POSE

    @property
    def args(self) -> Optional[argparse.Namespace]:
        return self.common.get("args")

    def arg(self, name: str, default=None):
        """One field of `args` (default when there are no args or no such field)."""
        return getattr(self.args, name, default) if self.args is not None else default

    @property
    def iteration(self) -> int:
        return 0 if self.release else int(self.common.get("iteration", 0))

    @property
    def consumed_train_samples(self) -> int:
        if self.earlier_format:
            return int(self.common.get("consumed_train_samples", 0))
        return int(self.arg("consumed_train_samples", 0) or 0)

    @property
    def global_batch_size(self) -> Optional[int]:
        """The saving run's global batch (earlier format: consumed samples per iteration)."""
        if self.earlier_format:
            return self.consumed_train_samples // self.iteration if self.iteration else None
        return self.arg("global_batch_size")

    @property
    def layout(self) -> Optional[Tuple[int, int, int]]:
        """(TP, PP, DP) of the saving run, None when unrecorded (a weights-only checkpoint)."""
        if self.earlier_format:
            parallel = self.common.get("parallel")
            return (parallel["tp"], parallel["pp"], parallel["dp"]) if parallel else None
        if self.args is None:
            return None
        return (self.arg("tensor_model_parallel_size", 1), self.arg("pipeline_model_parallel_size", 1),
                self.arg("data_parallel_size", 1))

    @property
    def optimizer_kind(self) -> Optional[str]:
        """"distributed", "plain" or None (no optimizer state saved)."""
        optimizer = self.common.get("optimizer")
        if optimizer is None or self.release:
            return None
        return "distributed" if "param_state_sharding_type" in optimizer else "plain"

    @property
    def content_metadata(self) -> Optional[dict]:
        return self.common.get("content_metadata")

    @property
    def sharding_type(self) -> Optional[str]:
        """How the distributed optimizer's state is sharded, read as Megatron-LM reads it: from
        `content_metadata`, else (checkpoints before megatron-core 0.13) from the saving flags."""
        if self.optimizer_kind != "distributed":
            return None
        if self.content_metadata and "distrib_optim_sharding_type" in self.content_metadata:
            return self.content_metadata["distrib_optim_sharding_type"]
        if self.earlier_format:  # it always saved dp_reshardable, and says so in the optimizer entry
            return self.common["optimizer"]["param_state_sharding_type"]
        return ("fully_sharded_model_space" if self.arg("ckpt_fully_parallel_save")
                else "dp_zero_gather_scatter")

    @cached_property
    def rng_shape(self) -> Optional[Tuple[int, ...]]:
        """The global shape of the saved `rng_state` object: (pp, tp) in Megatron-LM's layout,
        (pp, tp, dp) in the earlier one; None when no RNG state was saved."""
        from torch.distributed.checkpoint import FileSystemReader

        keys = FileSystemReader(str(self.directory)).read_metadata().state_dict_metadata
        for key in keys:
            if key.startswith("rng_state/shard_"):
                shape = key.rsplit("_", 1)[1]  # rng_state/shard_<offsets>_<shape>
                return tuple(int(n) for n in shape.split("."))
        return None

    def schedule_in_samples(self) -> Optional[dict]:
        """The saved LR / weight-decay schedule with every step count in samples (None when the
        checkpoint holds none). Megatron-LM and this project count samples: num_steps equals
        iteration x global batch. This project's earlier format counted iterations: num_steps equals
        the iteration, and the counts are multiplied by the global batch. Anything else is refused:
        the units cannot be told apart."""
        saved = self.common.get("opt_param_scheduler")
        if saved is None or self.release:
            return None
        saved = _with_current_names(saved)
        iteration, batch, num_steps = self.iteration, self.global_batch_size, saved["num_steps"]
        if batch is not None and num_steps == iteration * batch:
            return saved
        if num_steps == iteration and batch:
            return {k: v * batch if k in _STEP_KEYS else v for k, v in saved.items()}
        raise ValueError(
            f"--load {self.directory}: its learning-rate schedule has advanced {num_steps} steps, "
            f"neither iteration x global batch ({iteration} x {batch}) as Megatron-LM counts samples, "
            f"nor the iteration ({iteration}) as this project's earlier checkpoints counted; its "
            "units cannot be told (batch-size ramp-up or a changed global batch?). Start a new "
            "schedule from its weights with --finetune")


def _with_current_names(saved: dict) -> dict:
    """megatron-core's older scheduler keys under their current names (as its loader accepts)."""
    renames = {"start_lr": "max_lr", "warmup_iter": "lr_warmup_steps", "warmup_steps": "lr_warmup_steps",
               "end_iter": "lr_decay_steps", "decay_steps": "lr_decay_steps",
               "decay_style": "lr_decay_style", "num_iters": "num_steps"}
    return {renames.get(k, k): v for k, v in saved.items()}


def read_saved_state(ckpt_dir: Union[str, Path]) -> SavedState:
    """The SavedState of a resolved checkpoint directory (see layout.resolve_checkpoint_dir)."""
    ckpt_dir = Path(ckpt_dir)
    return SavedState(ckpt_dir, read_common_state(ckpt_dir), (ckpt_dir / CONFIG_FILE).is_file())
