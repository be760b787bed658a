"""Run worker scripts and the trainer under torchrun on gloo (CPU), as users launch training."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1]
REPO = TESTS_DIR.parent


def _env(extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def _check(proc, what):
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc


def torchrun(script: str, nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        str(TESTS_DIR / "distributed" / script), *args,
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    return _check(proc, script)


def train(args, nproc: int = 1, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m pose_megatron.train ARGS`, under torchrun when nproc > 1."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "pose_megatron.train"]
    else:
        cmd = [sys.executable, "-m", "pose_megatron.train"]
    proc = subprocess.run(cmd + [str(a) for a in args], env=_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    return _check(proc, "training") if check else proc


@functools.lru_cache(maxsize=None)
def corpus_flags() -> tuple:
    """--data-path / --tokenizer-model of the bundled sample corpus (built once, cached)."""
    from pose_megatron.corpus import ensure_sample_corpus

    corpus = ensure_sample_corpus()
    return ("--data-path", corpus.train_prefix, "--tokenizer-model", corpus.tokenizer_model)


def read_metrics(path) -> dict:
    """{iteration: training-step record} from a --metrics-file (validation records left out)."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return {r["iteration"]: r for r in records if "loss" in r}
