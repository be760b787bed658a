"""Runs the sections of the GPU check in a child process, each under its own time cap.

The child (run_h200.py --child) imports torch and megatron-core once and runs the sections in
order. Before each it writes the running file (which section, since when; kept outside the results
folder, whose file count the device tool limits); after each, `<name>.json` (its result, or its
error). The supervisor imports nothing heavy: it polls those files, and when a
section outlives its cap it kills the child, writes `<name>.json` as timed out, and starts a new
child for the sections after it. A section that crashes the child is recorded the same way. So a
time-out of the whole run (the device tool's limit) still returns every section that finished, and
one slow section never costs the others. `summary.json` lists every section's status and is
rewritten after each one; `children.log` holds every child's output.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from pose_megatron.files import atomic_write_text

POLL_SECONDS = 0.02
EXIT_GRACE_SECONDS = 30.0
"""How long a child that has finished its sections may take to exit before it is killed."""


@dataclass
class SupervisorConfig:
    """How the sections are run and bounded."""

    out_dir: Path
    """Where each section's JSON, summary.json and the child logs go."""
    child_command: List[str]
    """The child's command line without its sections (`--sections a,b` is appended); it writes
    `running_file` before each section."""
    running_file: Path
    """Where the child says what it is doing now: {"section": name, "started": unix time}."""
    caps: Dict[str, float]
    """Seconds each section may run, counted from its start in the child."""
    budget: float
    """Seconds for everything; sections not started by then are skipped."""
    start_timeout: float
    """Seconds a new child may take to start its first section (imports, CUDA start)."""
    env: Dict[str, str] = field(default_factory=dict)
    """The child's environment (PYTHONPATH with megatron-core, thread counts)."""


def write_json(path: Path, record: dict) -> None:
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent, or half-written by a writer that is not atomic: read it next poll


def _kill(child: subprocess.Popen) -> None:
    """End the child and anything it started (it leads its own process group)."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()


def _log_tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class Supervisor:
    def __init__(self, config: SupervisorConfig, sections: Sequence[str]):
        self.config = config
        self.sections = list(sections)
        self.status: Dict[str, str] = {name: "pending" for name in self.sections}
        self.started = time.time()
        self.children = 0
        config.out_dir.mkdir(parents=True, exist_ok=True)
        for name in self.sections:  # results of an earlier run in this folder are not this run's
            (config.out_dir / f"{name}.json").unlink(missing_ok=True)
        self.log_path = config.out_dir / "children.log"
        self.log_path.unlink(missing_ok=True)

    def _record(self, name: str, record: dict) -> None:
        write_json(self.config.out_dir / f"{name}.json", {"section": name, **record})
        self._finished(name, record["status"])

    def _finished(self, name: str, status: str) -> None:
        self.status[name] = status
        print(f"[gpu-check] {name}: {status} ({time.time() - self.started:.0f} s into the run)", flush=True)
        write_json(self.config.out_dir / "summary.json", {
            "sections": dict(self.status),
            "caps_s": {n: self.config.caps[n] for n in self.sections},
            "elapsed_s": round(time.time() - self.started, 1),
            "children": self.children,
        })

    def run(self) -> Dict[str, str]:
        remaining = list(self.sections)
        while remaining:
            if time.time() - self.started > self.config.budget:
                for name in remaining:
                    self._record(name, {"status": "skipped",
                                        "error": f"the run's budget of {self.config.budget:.0f} s was spent"})
                break
            remaining = self._run_child(remaining)
        return dict(self.status)

    def _run_child(self, sections: List[str]) -> List[str]:
        """Run `sections` in one child until it ends or one overruns; returns those not run."""
        self.children += 1
        out, log_path = self.config.out_dir, self.log_path
        self.config.running_file.unlink(missing_ok=True)
        with open(log_path, "a") as log:
            log.write(f"===== child {self.children}: {', '.join(sections)}\n")
            log.flush()
            child = subprocess.Popen(
                self.config.child_command + ["--sections", ",".join(sections)],
                stdout=log, stderr=subprocess.STDOUT, env=self.config.env, start_new_session=True,
            )
        # Until the child reports the next section: its imports may take start_timeout for the
        # first one; the gap before a later one counts against that section's own cap.
        waiting_since, start_limit = time.time(), self.config.start_timeout
        pending = list(sections)
        while pending:
            name = pending[0]
            record = read_json(out / f"{name}.json")
            if record is not None:
                self._finished(name, record["status"])
                pending.pop(0)
                if pending:
                    waiting_since, start_limit = time.time(), self.config.caps[pending[0]]
                continue
            running = read_json(self.config.running_file) or {}
            now = time.time()
            if running.get("section") == name:
                overrun = now - running["started"] > self.config.caps[name]
                if overrun or now - self.started > self.config.budget:
                    _kill(child)
                    why = (f"ran past its cap of {self.config.caps[name]:g} s" if overrun
                           else f"ran past the run's budget of {self.config.budget:.0f} s")
                    self._record(name, {"status": "timed_out", "error": why,
                                        "cap_s": self.config.caps[name]})
                    return pending[1:]
            elif now - waiting_since > start_limit:
                _kill(child)
                self._record(name, {"status": "failed", "error": (
                    f"the child did not start {name} within {start_limit:g} s"),
                    "log_tail": _log_tail(log_path)})
                return pending[1:]
            if child.poll() is not None and read_json(out / f"{name}.json") is None:
                if not running:  # it never got to a section: the next child would fare no better
                    for left in pending:
                        self._record(left, {"status": "failed", "log_tail": _log_tail(log_path),
                                            "error": f"the child exited with status "
                                                     f"{child.returncode} before any section"})
                    return []
                self._record(name, {"status": "failed", "log_tail": _log_tail(log_path), "error": (
                    f"the child exited with status {child.returncode} during {name}")})
                return pending[1:]
            time.sleep(POLL_SECONDS)
        try:
            child.wait(timeout=EXIT_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        _kill(child)  # and what it leaves behind: a multiprocessing helper outlives its os._exit
        return []
