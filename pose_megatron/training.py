"""The training step pieces fed to megatron-core's pipeline schedules."""

from __future__ import annotations

from functools import partial

import torch

from pose_megatron.runtime import get_device


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
    device = get_device()
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    output = model(tokens, position_ids, None, labels=labels)  # [b, s] token losses on the last stage
    return output, partial(loss_func, loss_mask)
