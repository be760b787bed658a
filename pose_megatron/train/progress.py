"""What a training run shows: log lines, a progress bar on terminals, optional TensorBoard scalars."""

from __future__ import annotations

import json
import sys
import time
from typing import Optional

import torch


def peak_memory_bytes() -> int:
    """Peak device memory on GPU; peak resident memory of this process on CPU (Linux)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def model_flops_per_token(num_params: int, num_layers: int, hidden_size: int, seq_length: int) -> float:
    """Training FLOPs per token: 6 N for the weights (forward + backward) plus causal attention
    scores and values, 6 x layers x hidden x seq (half of the full s x s, as the mask allows)."""
    return 6.0 * num_params + 6.0 * num_layers * hidden_size * seq_length


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class ProgressReporter:
    """Prints one line per log interval (on the reporting rank) and keeps a tqdm bar on terminals."""

    def __init__(self, train_iters: int, start_iteration: int, tokens_per_step: int,
                 flops_per_token: float, world_size: int, is_reporting_rank: bool,
                 tensorboard_dir: Optional[str] = None, metrics_file: Optional[str] = None):
        self.train_iters = train_iters
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.active = is_reporting_rank
        self.start_iteration = start_iteration
        self.window_step_time = 0.0  # seconds spent in training steps since the last log line
        self.window_iters = 0
        self.run_start = time.perf_counter()
        self.bar = None
        self.writer = None
        self.metrics = None
        if not self.active:
            return
        if metrics_file:
            self.metrics = open(metrics_file, "a")
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=train_iters, initial=start_iteration, unit="it", dynamic_ncols=True)
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise RuntimeError("--tensorboard-dir needs the tensorboard package: "
                                   "pip install tensorboard") from err
            self.writer = SummaryWriter(tensorboard_dir)

    def step(self, iteration: int, metrics: dict, step_time: float, log: bool) -> None:
        """Account one finished step of `step_time` seconds; print when `log`."""
        self.window_iters += 1
        self.window_step_time += step_time
        if not self.active:
            return
        if self.metrics is not None:  # every step, full precision: exact-resume checks read it
            tokens_per_s = self.tokens_per_step / step_time
            self._record({
                "iteration": iteration, "loss": metrics["loss"], "lr": metrics["lr"],
                "grad_norm": metrics["grad_norm"], "ms_per_it": step_time * 1e3,
                "tokens_per_s": tokens_per_s,
                "samples_per_s": metrics["samples_per_step"] / step_time,
                "tflops_per_device": tokens_per_s * self.flops_per_token / self.world_size / 1e12,
                "peak_memory_gib": peak_memory_bytes() / 2**30,
                "skipped": bool(metrics.get("skipped")),
            })
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if not log:
            return
        now = time.perf_counter()
        step_time = self.window_step_time / max(self.window_iters, 1)
        self.window_step_time, self.window_iters = 0.0, 0
        tokens_per_s = self.tokens_per_step / step_time
        samples_per_s = metrics["samples_per_step"] / step_time
        tflops = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        done = iteration - self.start_iteration
        elapsed = now - self.run_start
        eta = elapsed / max(done, 1) * (self.train_iters - iteration)
        values = {
            "lm loss": metrics["loss"], "learning rate": metrics["lr"],
            "grad norm": metrics["grad_norm"], "tokens/s": tokens_per_s,
            "samples/s": samples_per_s, "TFLOP/s/device": tflops,
            "peak memory GiB": peak_memory_bytes() / 2**30,
        }
        if metrics.get("loss_scale") is not None:
            values["loss scale"] = metrics["loss_scale"]
        line = (
            f"iteration {iteration:>8d}/{self.train_iters} | lm loss {metrics['loss']:.6f} | "
            f"lr {metrics['lr']:.3e} | grad norm {metrics['grad_norm']:.3f} | "
            f"{step_time * 1e3:.0f} ms/it | {tokens_per_s:,.0f} tokens/s | "
            f"{samples_per_s:.2f} samples/s | {tflops:.3f} TFLOP/s/device | "
            f"peak mem {values['peak memory GiB']:.2f} GiB | ETA {_format_duration(eta)}"
        )
        if metrics.get("skipped"):
            line += " | step skipped (loss scale overflow)"
        self.write(line)
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, iteration)

    def validation(self, iteration: int, loss: float) -> None:
        if not self.active:
            return
        ppl = float(torch.exp(torch.tensor(min(loss, 50.0))))
        self.write(f"validation at iteration {iteration} | lm loss {loss:.6f} | ppl {ppl:.3f}")
        if self.metrics is not None:
            self._record({"iteration": iteration, "validation_loss": loss, "validation_ppl": ppl})
        if self.writer is not None:
            self.writer.add_scalar("validation lm loss", loss, iteration)

    def _record(self, record: dict) -> None:
        """One JSON line of --metrics-file: training steps carry "loss", validations
        "validation_loss"; flushed at once so a reader (or a crash) sees every finished step."""
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()

    def write(self, line: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.metrics is not None:
            self.metrics.close()
