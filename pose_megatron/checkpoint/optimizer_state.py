"""What megatron-core's optimizers need around a checkpoint load, done in one place.

Without Apex or Transformer Engine (CPU, or a GPU build without them) megatron-core falls back to
torch's AdamW, and its DistributedOptimizer then has two faults on load (docs/reference.md,
"Megatron-LM checkpoints"; not specific to the CPU):
- building the load template calls `state_dict()`, which asserts ONE Adam `step` over all states;
  before the first step torch's AdamW has no state at all, so the assert fails;
- `load_state_dict` gives every parameter's state the SAME `step` tensor, which torch's AdamW then
  increments once per parameter (after one step the bias correction is that of step 1 + N); and
  that tensor is then overwritten by the step each parameter had when the load template was built
  (its param-state "step" is a non-persistent copy of the live state), not the saved one. Both
  are silent: a resume then takes wrong-sized steps.
And a schedule loaded with `--override-opt-param-scheduler` would still be bounded by the learning
rates stored in the optimizer's param groups, which `get_lr` prefers to the scheduler's own.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer


def _distributed_optimizers(optimizer) -> list:
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [part for part in parts if isinstance(part, DistributedOptimizer)]


def materialise_distributed_adam_state(optimizer) -> None:
    """Give an empty torch Adam state inside a DistributedOptimizer its tensors (and step 1) by one
    step on zero gradients at learning rate 0, which leaves every parameter as it is; the checkpoint
    then overwrites the state."""
    for part in _distributed_optimizers(optimizer):
        inner = part.optimizer
        if len(inner.state) or not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        saved_lrs = [group["lr"] for group in inner.param_groups]
        for group in inner.param_groups:
            group["lr"] = 0.0
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        inner.step()
        for group, lr in zip(inner.param_groups, saved_lrs):
            group["lr"] = lr
            for param in group["params"]:
                param.grad = None


def restore_adam_steps(optimizer, loaded: dict) -> None:
    """Give each parameter's Adam state its own `step` tensor, holding the checkpoint's step, after
    a DistributedOptimizer load. `loaded` is the "optimizer" entry the load returned: its param
    groups carry the saved step (the per-parameter copies in its param state do not: they are
    the template's, i.e. this process's state before the load)."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    saved = [loaded] if len(parts) == 1 else [loaded[index] for index in range(len(parts))]
    for part, state in zip(parts, saved):
        if not isinstance(part, DistributedOptimizer):
            continue
        steps = {group["step"] for group in state["optimizer"]["param_groups"] if "step" in group}
        if len(steps) != 1:
            continue  # Apex / Transformer Engine Adam keeps its step in the param groups
        step = float(steps.pop())
        for param_state in part.optimizer.state.values():
            if isinstance(param_state.get("step"), torch.Tensor):
                param_state["step"] = torch.tensor(step, dtype=param_state["step"].dtype,
                                                   device=param_state["step"].device)


def pair_param_groups_with_saved(optimizer, saved_schedule: dict) -> None:
    """Give the param groups the checkpoint's learning-rate bounds before a load. megatron-core 0.19
    pairs live and saved param groups by their (max_lr, min_lr, weight decay, multipliers) instead of
    their order, so a resume that overrides `--lr` would find no saved group; `set_schedule_bounds`
    applies the schedule the resume chose after the load."""
    for group in optimizer.param_groups:
        for key in ("max_lr", "min_lr"):
            if group.get(key) is not None and key in saved_schedule:
                group[key] = saved_schedule[key]


def set_schedule_bounds(optimizer, scheduler) -> None:
    """Make the scheduler's max / min learning rate the ones every param group follows, and apply
    the learning rate of its current step. The scheduler holds the schedule the resume chose (the
    checkpoint's, or the flags' with --override-opt-param-scheduler); param groups restored from
    the optimizer state would otherwise keep the checkpoint's bounds."""
    for group in optimizer.param_groups:
        if "max_lr" in group:
            group["max_lr"] = scheduler.max_lr
        if "min_lr" in group:
            group["min_lr"] = scheduler.min_lr
    scheduler.step(increment=0)
