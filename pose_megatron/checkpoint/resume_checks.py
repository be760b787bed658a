"""What a resume can load from a checkpoint, decided before training starts.

`plan_resume` compares the checkpoint's optimizer, schedule and RNG state (saved_state.SavedState)
with what this run builds. Where they cannot continue as they are, it raises ValueError naming the
flag to pass: `--no-load-optim` (fresh optimizer state), `--finetune` (weights only),
`--override-opt-param-scheduler` / `--use-checkpoint-opt-param-scheduler` (Megatron-LM's two ways
out of a schedule that differs), `--no-load-rng`. The parser calls it (so the message comes before
any process group) and the loader calls it again with the layout it runs at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from pose_megatron.checkpoint.megatron_args import DISTRIBUTED_OPTIMIZER_FORMAT
from pose_megatron.checkpoint.saved_state import SCHEDULE_KEYS, SCHEDULE_STEP_KEYS, SavedState


@dataclass
class LoadOptions:
    """How a run resumes a checkpoint (the trainer's --load flags)."""

    global_batch_size: int
    """Samples per step of this run (the schedule counts samples)."""
    expected_schedule: dict
    """The schedule this run builds (saved_state.SCHEDULE_KEYS, in samples)."""
    use_distributed_optimizer: bool = False
    """This run's optimizer is megatron-core's DistributedOptimizer (its state is sharded)."""
    finetune: bool = False
    """Weights only: progress, optimizer and schedule start afresh."""
    no_load_optim: bool = False
    """Fresh optimizer state; weights, schedule and progress restored."""
    no_load_rng: bool = False
    """Fresh RNG state (for a checkpoint whose RNG state does not fit this layout or device)."""
    override_opt_param_scheduler: bool = False
    """Continue with this run's schedule (from the checkpoint's sample count)."""
    use_checkpoint_opt_param_scheduler: bool = False
    """Continue with the checkpoint's schedule, whatever this run's flags say."""


@dataclass
class ResumePlan:
    """What a resume restores besides the weights, iteration and consumed samples."""

    load_optimizer: bool
    schedule: Optional[dict]
    """The checkpoint's schedule in samples (None: it holds none; the schedule then continues at
    the checkpoint's iteration x global batch)."""
    load_rng: bool
    notes: List[str] = field(default_factory=list)
    """What the run should say it leaves out."""


def _layout_text(layout: Tuple[int, int, int]) -> str:
    return "TP={} PP={} DP={}".format(*layout)


def _check_optimizer(saved: SavedState, where: str, layout, use_distributed_optimizer: bool) -> None:
    kind = saved.optimizer_kind
    fresh = ("pass --no-load-optim (fresh optimizer state; weights, schedule and iteration kept) or "
             "--finetune (weights only)")
    if kind is None:
        raise ValueError(f"--load {where} holds no optimizer state (saved with --no-save-optim); {fresh}")
    wanted = "distributed" if use_distributed_optimizer else "plain"
    if kind != wanted:
        flag = ("add --use-distributed-optimizer" if kind == "distributed"
                else "drop --use-distributed-optimizer")
        raise ValueError(f"--load {where} holds {kind}-optimizer state, this run builds the {wanted} "
                         f"optimizer: {flag} to resume it, or {fresh}")
    if saved.layout != layout:
        raise ValueError(
            f"{where} was saved at {_layout_text(saved.layout)}; this run is {_layout_text(layout)}. "
            "Optimizer state reloads only at the layout it was saved with: resume at that layout, "
            "or pass --no-load-optim (fresh optimizer state, schedule and iteration kept) or "
            "--finetune (weights only).")
    if kind == "distributed" and saved.sharding_type != DISTRIBUTED_OPTIMIZER_FORMAT:
        raise ValueError(
            f"--load {where} holds distributed-optimizer state in the {saved.sharding_type!r} "
            f"format; megatron-core reloads only {DISTRIBUTED_OPTIMIZER_FORMAT!r} without Apex or Transformer "
            f"Engine (and this trainer saves that): {fresh}")


def _steps(value, global_batch: Optional[int]) -> str:
    if global_batch and value % global_batch == 0:
        count = value // global_batch
        return f"{value} samples ({count} iteration{'s' * (count != 1)} of {global_batch})"
    return f"{value} samples"


def schedule_differences(saved: dict, expected: dict, saved_batch: Optional[int],
                         run_batch: int) -> List[str]:
    """'name: checkpoint X, flags Y' for every schedule field that differs (step counts also in
    iterations of the checkpoint's and of this run's global batch)."""
    differences = []
    for key in SCHEDULE_KEYS:
        if key in saved and saved[key] != expected[key]:
            if key in SCHEDULE_STEP_KEYS:
                shown = _steps(saved[key], saved_batch), _steps(expected[key], run_batch)
            else:
                shown = repr(saved[key]), repr(expected[key])
            differences.append(f"{key}: checkpoint {shown[0]}, flags {shown[1]}")
    return differences


def _check_schedule(saved: SavedState, where: str, expected: dict, global_batch: int,
                    override: bool, use_checkpoint: bool) -> Optional[dict]:
    if override and use_checkpoint:
        raise ValueError("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler "
                         "contradict each other; pass one")
    schedule = saved.schedule_in_samples()
    if schedule is None or override or use_checkpoint:
        return schedule
    differences = schedule_differences(schedule, expected, saved.global_batch_size, global_batch)
    if differences:
        raise ValueError(
            f"--load {where} continues a learning-rate schedule that differs from the flags' ("
            + "; ".join(differences) + "). Pass --override-opt-param-scheduler to train on with "
            "the flags' schedule, or --use-checkpoint-opt-param-scheduler to keep the checkpoint's")
    return schedule


def _rng_plan(saved: SavedState, layout, no_load_rng: bool, notes: List[str]) -> bool:
    if no_load_rng:
        return False
    shape = saved.rng_shape
    if shape is None:
        notes.append("the checkpoint holds no RNG state (saved with --no-save-rng): RNG not restored")
        return False
    tp, pp, dp = layout
    # Megatron-LM's layout holds one state per (pp, tp) rank; the earlier one per (pp, tp, dp).
    if shape == ((pp, tp) if len(shape) == 2 else (pp, tp, dp)):
        return True
    notes.append(f"RNG state saved at {_layout_text(saved.layout)} is not restored at "
                 f"{_layout_text(layout)}")
    return False


def plan_resume(saved: SavedState, layout: Tuple[int, int, int], options: LoadOptions) -> ResumePlan:
    """What to restore when a run at `layout` (TP, PP, DP) resumes `saved` as `options` say;
    ValueError naming the flag to pass where it cannot."""
    where = str(saved.directory)
    no_load_optim, no_load_rng = options.no_load_optim, options.no_load_rng
    global_batch = options.global_batch_size
    if not no_load_optim:
        _check_optimizer(saved, where, layout, options.use_distributed_optimizer)
    schedule = _check_schedule(saved, where, options.expected_schedule, global_batch,
                               options.override_opt_param_scheduler,
                               options.use_checkpoint_opt_param_scheduler)
    notes: List[str] = []
    if schedule is None:
        notes.append(f"the checkpoint holds no schedule state: it continues at sample "
                     f"{saved.iteration * global_batch} (iteration {saved.iteration})")
    load_rng = _rng_plan(saved, layout, no_load_rng, notes)
    return ResumePlan(load_optimizer=not no_load_optim, schedule=schedule, load_rng=load_rng,
                      notes=notes)
