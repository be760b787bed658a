"""Compatibility with the machines megatron-core was not written for.

megatron-core has no CPU path. On a machine without CUDA, `enable_cpu_fallbacks()` redirects its
CUDA-only call sites to the CPU (pose_megatron/_compat/cpu.py: a per-module stand-in for `torch`,
nothing patched in torch itself). It is applied explicitly, by every entry point that runs
megatron-core (the trainer, tools/, benchmarks/, the test conftest and spawned test workers), and
logs one line when it does; `runtime.initialize_distributed` refuses to start on CPU without it. The
stand-ins were checked call site by call site against the megatron-core releases in
`CPU_TESTED_MEGATRON_CORE`; any other release is refused on CPU, since a moved call site would fail
deep inside a training step. With CUDA nothing is applied and nothing is checked.
"""

from __future__ import annotations

import logging
from importlib import metadata

import torch

logger = logging.getLogger(__name__)

CPU_TESTED_MEGATRON_CORE = ("0.16.1", "0.17.1", "0.18.2", "0.19.2")
"""megatron-core releases whose CUDA-only call sites the CPU stand-ins were checked against (the
whole test suite passed on CPU with each)."""


class UnsupportedMegatronCore(RuntimeError):
    """The installed megatron-core is not one the CPU layer was checked against."""


def megatron_core_version() -> str:
    """The installed megatron-core release (from its package metadata; imports nothing)."""
    return metadata.version("megatron-core")


def check_cpu_version(version: str | None = None) -> str:
    """The installed release, or UnsupportedMegatronCore naming the supported ones and the fix."""
    version = version or megatron_core_version()
    if version not in CPU_TESTED_MEGATRON_CORE:
        supported = ", ".join(CPU_TESTED_MEGATRON_CORE)
        raise UnsupportedMegatronCore(
            f"megatron-core {version} is installed, but pose_megatron runs megatron-core on CPU only "
            f"with the releases its CPU layer was checked against ({supported}); install one "
            f"(pip install megatron-core=={CPU_TESTED_MEGATRON_CORE[-1]}; on Python 3.11, "
            f"megatron-core=={CPU_TESTED_MEGATRON_CORE[0]}) or run on a GPU"
        )
    return version


def enable_cpu_fallbacks() -> bool:
    """Let megatron-core run here: without CUDA, check its release and redirect its CUDA-only call
    sites (once per process, one log line); with CUDA, do nothing. Returns whether it is active."""
    if torch.cuda.is_available():
        return False
    from pose_megatron._compat import cpu

    if cpu.is_applied():
        return True
    version = check_cpu_version()
    cpu.apply()
    logger.info("no CUDA: megatron-core %s runs on CPU (%d modules' CUDA-only calls redirected by "
                "pose_megatron._compat)", version, len(cpu.PATCHED_MODULES))
    return True


def cpu_fallbacks_active() -> bool:
    """Whether `enable_cpu_fallbacks()` has run in this process (False on GPU machines)."""
    from pose_megatron._compat import cpu

    return cpu.is_applied()
