"""One training step and one validation pass, through megatron-core's pipeline schedules.

Every pipeline stage reads the batch itself, since each stage applies RoPE from the position ids.
"""

from __future__ import annotations

from functools import partial
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from pose_megatron import runtime


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Token-weighted LM loss of one micro-batch, in the schedules' 3-tuple form.

    Returns (sum of masked token losses, number of loss tokens, {"lm loss": [sum, tokens]}); the
    schedule divides by the token count, and reporting sums [sum, tokens] over micro-batches so the
    logged loss is the exact token-weighted mean.
    """
    losses = output_tensor.float()  # [b, s] per-token cross entropy
    mask = loss_mask.float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    """One micro-batch: every pipeline stage reads the batch, since each needs its position ids."""
    batch = next(data_iterator)
    device = runtime.get_device()
    tokens = batch["tokens"].to(device, non_blocking=True)  # [b, s]
    labels = batch["labels"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    output = model(tokens, position_ids, None, labels=labels)  # [b, s] token losses on the last stage
    return output, partial(loss_func, loss_mask)


def _reduce_lm_loss(reports: list) -> float:
    """Token-weighted mean loss over micro-batches and data-parallel ranks (last stage), shared
    with every rank so any rank can report it."""
    if parallel_state.is_pipeline_last_stage():
        total = torch.stack([r["lm loss"] for r in reports]).sum(0)
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    else:
        total = torch.zeros(2)
    total = total.to(runtime.get_device())
    # Send it from the last stage to every stage (sum: other stages contribute zeros).
    dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return (total[0] / total[1].clamp(min=1)).item()


def _schedule(model, data_iterator, num_microbatches, seq_length, micro_batch_size, forward_only):
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data_iterator, model=[model],
        num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=forward_only,
    )


def train_step(model, optimizer, scheduler, data_iterator: Iterator, num_microbatches: int,
               seq_length: int, micro_batch_size: int) -> dict:
    """Forward and backward over one global batch, then the optimizer and scheduler step (the
    scheduler counts samples, as Megatron-LM's: it advances by the global batch)."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    reports = _schedule(model, data_iterator, num_microbatches, seq_length, micro_batch_size, False)
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        global_batch = num_microbatches * micro_batch_size * parallel_state.get_data_parallel_world_size()
        scheduler.step(increment=global_batch)
    fp16 = bool(getattr(optimizer.config, "fp16", False))
    return {
        "loss": _reduce_lm_loss(reports),
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": optimizer.param_groups[0]["lr"],
        "skipped": not update_successful,
        "loss_scale": optimizer.get_loss_scale().item() if fp16 else None,
    }


@torch.no_grad()
def evaluate(model, data_iterator: Iterator, eval_iters: int, num_microbatches: int,
             seq_length: int, micro_batch_size: int) -> float:
    """Mean validation loss over `eval_iters` global batches."""
    model.eval()
    reports = []
    for _ in range(eval_iters):
        reports += _schedule(model, data_iterator, num_microbatches, seq_length, micro_batch_size, True)
    model.train()
    return _reduce_lm_loss(reports)
