"""The PoSE training loop: build, then step / validate / save until done, preempted or told to stop.

megatron-core 0.16 ships no megatron.training, so the loop is this project's: build_trainer
(train/build.py) assembles megatron-core's pieces, train_step (train/step.py) runs one global batch
through its pipeline schedule, and checkpoints follow Megatron-LM's layout (checkpoint/).
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import signal
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from pose_megatron import runtime
from pose_megatron.checkpoint.layout import read_tracker
from pose_megatron.checkpoint.training_state import save_training_checkpoint
from pose_megatron.train.build import Trainer, build_trainer, checkpoint_args
from pose_megatron.train.config import TrainingRun
from pose_megatron.train.step import evaluate, train_step


class _StopSignal:
    """SIGTERM (a scheduler's preemption) or a first Ctrl-C (SIGINT) asks the loop to save and exit
    after the current step; a second one aborts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        if self.received is not None:
            # At once: no cleanup that could wait on a collective with ranks that already left.
            sys.stderr.write(f"second {signal.Signals(signum).name}: aborting without saving\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.received = signal.Signals(signum).name

    def any_rank(self) -> bool:
        flag = torch.tensor([int(self.received is not None)], device=runtime.get_device())
        dist.all_reduce(flag)  # all ranks stop at the same step
        return bool(flag.item())

    def restore(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


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
    if progress.iteration >= t.train_iters:
        trainer.reporter.write(f"already at iteration {progress.iteration} (--train-iters "
                               f"{t.train_iters}): nothing to train, nothing rewritten")
        return None
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
            reason = stop.received or "--exit-interval"
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


class SaveFailed(RuntimeError):
    """A checkpoint could not be written; says why, and what is still on disk."""


def _save(trainer: Trainer) -> str:
    root, iteration = trainer.run.training.save, trainer.progress.iteration
    try:
        saved = save_training_checkpoint(
            root, trainer.model.module, trainer.optimizer, trainer.scheduler, trainer.progress,
            trainer.run_config, training_args=checkpoint_args(trainer.run),
            use_distributed_optimizer=trainer.run.training.use_distributed_optimizer)
    except (Exception, CheckpointException) as err:  # torch's CheckpointException is a BaseException
        if not _out_of_space(err, root):
            raise
        latest = read_tracker(root)
        raise SaveFailed(
            f"no space left on device under --save {root} while saving iteration {iteration}; "
            + (f"the latest complete checkpoint is still iteration {latest}" if latest is not None
               else "no complete checkpoint exists yet")
            + f": free space and resume with --load {root}") from None
    trainer.reporter.write(f"saved checkpoint {saved}")
    return str(saved)


def _out_of_space(err: BaseException, root: str) -> bool:
    """ENOSPC anywhere in the chain. torch's zip writer reports a short write only as "enforce fail
    at inline_container.cc ... unexpected pos", and the save's temporary directory is gone by now,
    so that message, or a file system under `root` that is still nearly full, counts too."""
    seen = err
    while seen is not None:
        text = str(seen)
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC or "No space left" in text \
                or ("inline_container" in text and "unexpected pos" in text):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(root).free < (16 << 20)
    except OSError:
        return False
