"""Sections 3 and 4 of the GPU check: PoSE against full-length training, and evaluation speed.

3. long_context: the trainer's own step (bf16 Float16Module, megatron DDP, the optimizer, the
   pipeline schedule) on one model, first PoSE at the short window with positions up to the target,
   then full-length training at the target window. Step time and peak memory of each; the
   paper's figure is 14.5 vs 31 GB per V100 for LLaMA-7B at 2k -> 16k (docs/reference.md, "Paper
   numbers"). Random tokens: the step's cost does not depend on the text.
4. evaluation: the perplexity tool's tokens/s on one window at the long length, Megatron
   checkpoint and Hugging Face directory, against a plain transformers SDPA forward with labels
   (benchmarks/bench_eval.py's measurement, at this size).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Iterator

import torch

import common
from bench_eval import measure_rates
from model_sections import goal, start_megatron
from sizes import CheckSizes
from pose_megatron import runtime
from pose_megatron.rope import RopeScaling
from pose_megatron.train.build import setup_model_and_optimizer
from pose_megatron.train.config import TrainingConfig
from pose_megatron.train.step import train_step


def synthetic_batches(seq: int, vocab: int, positions: torch.Tensor) -> Iterator[dict]:
    """Endless micro-batches of one sample [1, seq] in the trainer's batch layout, on CPU (the
    trainer's forward step moves them), each with these position ids [1, seq]."""
    g = torch.Generator().manual_seed(0)
    positions = positions.cpu()
    while True:
        tokens = torch.randint(0, vocab, (1, seq + 1), generator=g)
        yield {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
               "loss_mask": torch.ones(1, seq), "position_ids": positions}


def _train_run(model, optimizer, scheduler, seq: int, vocab: int, positions: torch.Tensor,
               steps: int) -> dict:
    """Step time and peak memory of `steps` trainer steps at window `seq`, after one untimed step."""
    batches = synthetic_batches(seq, vocab, positions)
    train_step(model, optimizer, scheduler, batches, 1, seq, 1)  # also creates the optimizer state
    in_use = common.reset_peak_memory()
    times = [common.timed(lambda: train_step(model, optimizer, scheduler, batches, 1, seq, 1))[1]
             for _ in range(steps)]
    peak = common.peak_memory()
    return {"seq": seq, "step_ms": statistics.median(times) * 1e3, "peak_memory_gib": peak / 2**30,
            "step_memory_gib": (peak - in_use) / 2**30, "memory_before_gib": in_use / 2**30}


def long_context(sizes: CheckSizes) -> dict:
    start_megatron()
    cfg, seq, target = sizes.step_model, sizes.long_seq, sizes.long_target
    scaling = RopeScaling("yarn-revised", factor=target / seq, original_max_position_embeddings=seq)
    training = TrainingConfig(train_iters=2 * (sizes.long_steps + 1), lr=1e-5, lr_warmup_iters=0,
                              precision=sizes.trainer_precision)
    model, optimizer, scheduler = setup_model_and_optimizer(cfg, scaling, training, target, 1, 1,
                                                            global_batch_size=1)
    device = runtime.get_device()
    pose = _train_run(model, optimizer, scheduler, seq, cfg.vocab_size,
                      common.pose_position_batch(1, seq, target), sizes.long_steps)
    full = _train_run(model, optimizer, scheduler, target, cfg.vocab_size,
                      torch.arange(target, device=device)[None], sizes.long_steps)
    del model, optimizer, scheduler
    runtime.destroy()
    time_ratio = pose["step_ms"] / full["step_ms"]
    memory_ratio = pose["peak_memory_gib"] / full["peak_memory_gib"]
    return {
        "model": dataclasses.asdict(cfg) | {"rope": "yarn-revised"},
        "precision": sizes.trainer_precision,
        "pose": pose | {"target": target},
        "full_length": full | {"target": target},
        "step_time_ratio": time_ratio,
        "peak_memory_ratio": memory_ratio,
        "paper": {"pose_gb": 14.5, "full_length_gb": 31.0, "ratio": 14.5 / 31.0,
                  "setting": "LLaMA-7B 2k -> 16k, 8x V100, global batch 16 (read off a plot)"},
        "note": ("median trainer step (forward, backward, optimizer) after one untimed step; peak "
                 "memory includes weights, gradients and optimizer state (memory_before_gib), "
                 "step memory is the growth above that during the timed steps"),
    }


def evaluation(sizes: CheckSizes) -> dict:
    start_megatron()
    cfg, length = sizes.eval_model, sizes.eval_length
    scaling = RopeScaling("linear", factor=length / cfg.max_position_embeddings)
    measured = measure_rates(cfg, scaling, length, sizes.eval_rounds, sizes.dtype)
    rates = measured["tokens_per_s"]
    runtime.destroy()
    ratio = rates["megatron"] / rates["transformers"]
    return {
        "model": dataclasses.asdict(cfg) | {"rope": "linear"},
        "dtype": sizes.dtype,
        "length": length,
        "rounds": sizes.eval_rounds,
        "tokens_per_s": rates,
        "slowest_over_best": measured["spread"],
        "ratio_megatron": ratio,
        "ratio_hf_backend": rates["hf"] / rates["transformers"],
        "goals": {"ratio_megatron": goal(ratio, ">=", 1.0)},
        "note": "one window of `length` tokens; best of the rounds per side, sides alternated",
    }
