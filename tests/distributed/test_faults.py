"""Faults at the process level: real signals to real processes, full and read-only disks (tmpfs in a
private mount namespace), re-runs of a finished job. Nothing is lost and nothing is left running."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch import REPO, _env, corpus_flags, read_metrics
from private_mounts import run_with_tmpfs

from pose_megatron.checkpoint.layout import read_tracker

TINY = ["--model", "tiny", "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "2",
        "--eval-iters", "0", "--precision", "fp32", "--lr-warmup-iters", "0", "--log-interval", "1"]
LAUNCH_ENV = {"MODEL": "tiny", "SEQ_LENGTH": "64", "TARGET_LENGTH": "256", "GLOBAL_BATCH_SIZE": "2",
              "MICRO_BATCH_SIZE": "1", "LOG_INTERVAL": "1", "WARMUP": "0"}


def trainer_argv(*extra):
    return [sys.executable, "-m", "pose_megatron.train", *TINY, *corpus_flags(), *map(str, extra)]


def wait_for_steps(metrics, count, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and len(read_metrics(metrics)) >= count:
            return
        assert proc.poll() is None, "the run ended before it was signalled"
        time.sleep(0.2)
    pytest.fail(f"no {count} steps within {timeout} s")


def _default_sigint():
    """Children start with SIGINT at its default, as under a terminal: a job started in the background
    of a non-interactive shell (nohup, some CI runners) inherits it ignored, and bash cannot trap a
    signal that was ignored when it started."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class LaunchScript:
    """examples/pretrain_pose_llama.sh on CPU with a tiny model, as the README's first command runs it."""

    def __init__(self, tmp_path, train_iters, *extra, name="run", save="launch-ck", load=None):
        self.save = tmp_path / save
        self.metrics = tmp_path / f"{name}.jsonl"
        self.launch_id = f"test-{os.getpid()}-{time.time_ns()}"
        env = _env({**LAUNCH_ENV, "TRAIN_ITERS": str(train_iters), "SAVE": str(self.save),
                    "PYTHON": sys.executable, "POSE_MEGATRON_LAUNCH_ID": self.launch_id,
                    **({"LOAD": str(load)} if load else {})})
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
        self.proc = subprocess.Popen(
            ["bash", str(REPO / "examples" / "pretrain_pose_llama.sh"), "--eval-iters", "0",
             "--metrics-file", str(self.metrics), *map(str, extra)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
        self.torchrun = None

    def group(self):
        """torchrun's pid (= its process group): the script's child under setsid."""
        deadline = time.time() + 60
        while self.torchrun is None and time.time() < deadline:
            found = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
            pids = [int(p) for p in found.stdout.split()]
            self.torchrun = next((p for p in pids if os.getpgid(p) == p), None)
            time.sleep(0.1)
        assert self.torchrun is not None
        return self.torchrun

    def workers(self):
        found = subprocess.run(["pgrep", "-P", str(self.group())], capture_output=True, text=True)
        return [int(p) for p in found.stdout.split()]

    def finish(self, timeout=300):
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def group_is_gone(self) -> bool:
        """No process of this run is left: none inherited its launch id (workers, checkpoint
        writers, multiprocessing managers, torchrun)."""
        left = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if f"POSE_MEGATRON_LAUNCH_ID={self.launch_id}".encode() in environ.read_bytes().split(b"\0"):
                    left.append(environ.parent.name)
            except OSError:
                pass
        return not left


def test_sigterm_to_the_launch_script_saves_exits_0_and_a_rerun_resumes(tmp_path):
    run = LaunchScript(tmp_path, 1000, "--save-interval", "1000")
    wait_for_steps(run.metrics, 2, run.proc)
    group = run.group()
    run.proc.send_signal(signal.SIGTERM)
    code, out, err = run.finish()
    assert code == 0, err[-3000:]
    steps = read_tracker(run.save)
    assert steps >= 2 and f"checkpoint: {run.save}" in out
    assert run.group_is_gone(), f"processes of group {group} outlived the script"
    # The README's first command again: it resumes from SAVE (a finished run says so and exits 0),
    # even when LOAD still names the checkpoint the run started from (LOAD is then not used).
    # TRAIN_ITERS = the saved iteration makes it a finished run; that changes the schedule's length,
    # which a resume refuses unless told which schedule to keep.
    before = (run.save / f"iter_{steps:07d}").stat().st_mtime_ns
    base = tmp_path / "converted-base-model"  # not there: a LOAD the script must not pass on
    again = LaunchScript(tmp_path, steps, "--use-checkpoint-opt-param-scheduler", name="again",
                         load=base)
    code, out, err = again.finish()
    assert code == 0, err[-3000:]
    assert f"{run.save} holds a checkpoint: resuming it (LOAD={base} is not used)" in out
    assert f"already at iteration {steps}" in out
    assert (run.save / f"iter_{steps:07d}").stat().st_mtime_ns == before  # not rewritten


def test_ctrl_c_saves_and_exits_0(tmp_path):
    metrics = tmp_path / "m.jsonl"
    proc = subprocess.Popen(trainer_argv("--train-iters", "1000", "--save", tmp_path / "ck",
                                         "--metrics-file", metrics),
                            env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    wait_for_steps(metrics, 2, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopping at iteration" in out and "(SIGINT)" in out
    assert read_tracker(tmp_path / "ck") == max(read_metrics(metrics))
    # Through the launch script (Ctrl-C reaches the script; it passes it to the workers).
    run = LaunchScript(tmp_path, 1000)
    wait_for_steps(run.metrics, 1, run.proc)
    run.group()
    run.proc.send_signal(signal.SIGINT)
    code, out, err = run.finish(timeout=120)
    assert code == 0 and "SIGINT: the workers save a checkpoint" in err, err[-3000:]
    assert read_tracker(run.save) == max(read_metrics(run.metrics))
    assert run.group_is_gone()


def test_a_second_signal_aborts_at_once(monkeypatch):
    """Two signals in quick succession reach a Python process as one, so this runs in-process."""
    from pose_megatron.train import loop

    exits = []
    monkeypatch.setattr(loop.os, "_exit", exits.append)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    stop = loop._StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.received == "SIGINT" and exits == []
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert exits == [128 + signal.SIGTERM]
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before


def test_a_killed_rank_leaves_no_process_behind(tmp_path):
    run = LaunchScript(tmp_path, 1000, "--save-interval", "1")
    deadline = time.time() + 180
    while read_tracker(run.save) is None if run.save.exists() else True:
        assert time.time() < deadline and run.proc.poll() is None
        time.sleep(0.2)
    os.kill(run.workers()[0], signal.SIGKILL)
    code, _, _ = run.finish()
    assert code != 0
    time.sleep(0.5)
    assert run.group_is_gone(), "a checkpoint writer or tracker process outlived the run"


def test_launch_script_refuses_non_numeric_settings(tmp_path):
    env = _env({"TRAIN_ITERS": "1k", "SAVE": str(tmp_path / "ck"), "PYTHON": sys.executable})
    proc = subprocess.run(["bash", str(REPO / "examples" / "pretrain_pose_llama.sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "TRAIN_ITERS=1k must be a whole number" in proc.stderr


def test_full_disk_during_a_save_is_reported_as_such(tmp_path):
    save = tmp_path / "ck"
    save.mkdir()
    proc = run_with_tmpfs(save, trainer_argv("--train-iters", "2", "--save", save), size="2m",
                          env=_env())
    assert proc.returncode == 1
    error = proc.stderr.strip().splitlines()[-1]
    assert "no space left on device under --save" in error and "no complete checkpoint exists yet" in error
    assert "Traceback" not in proc.stderr


def test_read_only_save_and_data_directories_fail_before_training(tmp_path):
    save = tmp_path / "ck"
    save.mkdir()
    proc = run_with_tmpfs(save, trainer_argv("--train-iters", "2", "--save", save), read_only=True,
                          env=_env())
    assert proc.returncode == 2 and "is not writable" in proc.stderr.splitlines()[-1]
    assert "iteration" not in proc.stdout
    # A data directory that cannot take the index caches: the error names --data-cache-path.
    data, source = tmp_path / "data", tmp_path / "source"
    data.mkdir()
    source.mkdir()
    prefix = corpus_flags()[1]
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, source / ("corpus" + ext))
    argv = [str(data / "corpus") if a == prefix else a for a in trainer_argv("--train-iters", "2")]
    proc = run_with_tmpfs(data, argv, read_only=True, populate_from=source, size="64m", env=_env())
    assert proc.returncode == 2, proc.stderr
    assert "pass --data-cache-path DIR" in proc.stderr.splitlines()[-1]
