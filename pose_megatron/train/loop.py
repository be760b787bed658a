"""The PoSE training loop: build, then step / validate / save until done, preempted or told to stop.

megatron-core 0.16 ships no megatron.training, so the loop is this project's: build_trainer
(train/build.py) assembles megatron-core's pieces, train_step (train/step.py) runs one global batch
through its pipeline schedule, and checkpoints follow Megatron-LM's layout (checkpoint/).
"""

from __future__ import annotations

import math
import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

from pose_megatron import runtime
from pose_megatron.checkpoint.training_state import save_training_checkpoint
from pose_megatron.train.build import Trainer, build_trainer
from pose_megatron.train.config import TrainingRun
from pose_megatron.train.step import evaluate, train_step


class _StopSignal:
    """SIGTERM (a scheduler's preemption) asks the loop to save and exit after the current step."""

    def __init__(self):
        self.received = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def any_rank(self) -> bool:
        flag = torch.tensor([int(self.received)], device=runtime.get_device())
        dist.all_reduce(flag)  # all ranks stop at the same step
        return bool(flag.item())

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def run_training(run: TrainingRun) -> Optional[str]:
    """Train as `run` says; returns the final checkpoint directory (None without --save)."""
    trainer = build_trainer(run)
    stop = _StopSignal()
    try:
        saved = train_loop(trainer, stop)
    finally:
        stop.restore()
        trainer.reporter.close()
    runtime.destroy()
    return saved


def train_loop(trainer: Trainer, stop: _StopSignal) -> Optional[str]:
    """Steps until train_iters (or a stop); saves periodically, on a stop and at the end."""
    t, progress = trainer.run.training, trainer.progress
    saved, saved_at = None, None
    while progress.iteration < t.train_iters:
        _step(trainer)
        if t.eval_iters and progress.iteration % t.eval_interval == 0:
            _validate(trainer)
        stopping = stop.any_rank() or bool(t.exit_interval and progress.iteration % t.exit_interval == 0)
        periodic = bool(t.save_interval and progress.iteration % t.save_interval == 0)
        if t.save and (periodic or stopping):
            saved, saved_at = _save(trainer), progress.iteration
        if stopping:
            reason = "SIGTERM" if stop.received else "--exit-interval"
            trainer.reporter.write(f"stopping at iteration {progress.iteration} ({reason})")
            return saved
    if t.save and saved_at != progress.iteration:
        saved = _save(trainer)
    return saved


def _step(trainer: Trainer) -> None:
    run, progress = trainer.run, trainer.progress
    started = time.perf_counter()
    metrics = train_step(trainer.model, trainer.optimizer, trainer.scheduler, trainer.train_iter,
                         run.num_microbatches, run.pose.seq_length, run.training.micro_batch_size)
    step_time = time.perf_counter() - started
    progress.iteration += 1
    progress.consumed_train_samples += run.global_batch_size
    metrics["samples_per_step"] = run.global_batch_size
    if not math.isfinite(metrics["loss"]):
        raise FloatingPointError(f"loss is {metrics['loss']} at iteration {progress.iteration}")
    log = progress.iteration % run.training.log_interval == 0 or progress.iteration == 1
    trainer.reporter.step(progress.iteration, metrics, step_time, log)


def _validate(trainer: Trainer) -> None:
    run = trainer.run
    loss = evaluate(trainer.model, trainer.valid_iter(), run.training.eval_iters,
                    run.num_microbatches, run.pose.seq_length, run.training.micro_batch_size)
    trainer.reporter.validation(trainer.progress.iteration, loss)


def _save(trainer: Trainer) -> str:
    saved = save_training_checkpoint(trainer.run.training.save, trainer.model.module,
                                     trainer.optimizer, trainer.scheduler, trainer.progress,
                                     trainer.run_config)
    trainer.reporter.write(f"saved checkpoint {saved}")
    return str(saved)
