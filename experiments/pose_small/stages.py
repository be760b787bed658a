"""Cached stages of the small reproduction: subprocess runs, their cost, and the record of what ran.

Every stage writes its outputs under --out and a record into state.json: what it ran (its
fingerprint, e.g. the command's flags), its outputs, and its wall and CPU seconds. A later
invocation skips a stage whose record has the same fingerprint and whose outputs still exist, so a
run killed half way resumes at the first unfinished stage, and a stage whose inputs changed is
redone. CPU seconds are summed over the stage's processes (the machine is shared, so wall time
depends on the load; CPU time is the comparable cost).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from pose_megatron.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
"""The checkout: tools/ are run from it."""


def log(message: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


@contextmanager
def timed() -> Iterator[Dict[str, float]]:
    """Measures the block: the dict gets wall_seconds and cpu_seconds (this process and every
    child that finished inside the block) when the block ends."""
    cost: Dict[str, float] = {}
    wall, cpu = time.perf_counter(), _cpu_seconds()
    yield cost
    cost["wall_seconds"] = time.perf_counter() - wall
    cost["cpu_seconds"] = _cpu_seconds() - cpu


def content_hash(paths) -> str:
    """Hash of the files' bytes."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def run_tool(args: List[str], log_file: Path, nproc: int = 0) -> Dict[str, float]:
    """Run `python ARGS` (under torchrun with `nproc` processes when nproc > 0), output to
    log_file; returns its wall and CPU seconds. A failure raises with the log's tail."""
    command = [sys.executable]
    if nproc:
        command += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    command += args
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    with timed() as cost:
        with open(log_file, "w") as out:
            out.write(" ".join(command) + "\n")
            out.flush()
            code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if code != 0:
        tail = "".join(open(log_file).readlines()[-30:])
        raise RuntimeError(f"{' '.join(args[:3])} failed ({code}); see {log_file}:\n{tail}")
    return cost


def read_training_metrics(path: Path) -> dict:
    """Throughput, memory, final loss and validations from the trainer's --metrics-file (one JSON
    object a line: training steps carry "loss", validation passes "validation_loss"). The first
    step, which includes warm-up, is left out of the throughput when later ones exist."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the trainer writes it when run with --metrics-file")
    steps, validation = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "validation_loss" in record:
            validation.append({"iteration": record["iteration"], "loss": record["validation_loss"],
                               "ppl": record["validation_ppl"]})
        elif "loss" in record:
            steps.append(record)
    if not steps:
        raise ValueError(f"{path} records no training step; rerun the stage with --force")
    timed_steps = steps[1:] or steps
    return {
        "tokens_per_s": statistics.median(s["tokens_per_s"] for s in timed_steps),
        "ms_per_it": statistics.median(s["ms_per_it"] for s in timed_steps),
        "peak_mem_gib": max(s["peak_memory_gib"] for s in steps),
        "final_loss": steps[-1]["loss"],
        "steps": len(steps),
        "validation": validation,
    }


class StageCache:
    """state.json under the output directory: one record per finished stage."""

    def __init__(self, out: Path, force: bool = False):
        self.file = out / "state.json"
        self.state: dict = json.loads(self.file.read_text()) if self.file.exists() and not force else {}

    def get(self, key: str, fingerprint, *outputs: Path) -> Optional[dict]:
        """The stage's record when it ran with this fingerprint and its outputs exist, else None."""
        record = self.state.get(key)
        if record is None or record.get("fingerprint") != fingerprint:
            return None
        return record if all(Path(p).exists() for p in outputs) else None

    def put(self, key: str, fingerprint, record: dict) -> dict:
        self.state[key] = {**record, "fingerprint": fingerprint}
        atomic_write_text(self.file, json.dumps(self.state, indent=2))
        return self.state[key]

    def identity(self, key: str) -> str:
        """What a dependent stage's fingerprint records of stage `key`: its content hash when it
        produced data (the same data from edited code changes nothing downstream), else a hash of
        its own fingerprint (so a redone upstream stage redoes everything after it)."""
        record = self.state.get(key)
        if record is None:
            raise KeyError(f"stage {key} has not run")
        if "content" in record:
            return record["content"]
        return hashlib.sha256(json.dumps(record["fingerprint"], sort_keys=True).encode()).hexdigest()[:16]

    def costs(self) -> Dict[str, Dict[str, float]]:
        """Wall and CPU seconds of every recorded stage, in the order they first ran."""
        return {key: {"wall_seconds": r["wall_seconds"], "cpu_seconds": r["cpu_seconds"]}
                for key, r in self.state.items() if isinstance(r, dict) and "cpu_seconds" in r}
