"""Process setup: torch.distributed, megatron-core's model-parallel groups, seeds and the device.

Works the same under torchrun (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in the
environment) and as a plain single process (no variables: a one-process group on a free local port).
NCCL when CUDA is present, gloo otherwise (after the entry point enabled pose_megatron._compat).
"""

from __future__ import annotations

import datetime
import os
import random
import socket

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The compute / storage dtypes by the names every flag uses (Megatron's --bf16 / --fp16 spelling)."""


def dtype_from_name(name: str) -> torch.dtype:
    """fp32 / bf16 / fp16 -> torch dtype; "auto" is bf16 on a GPU and fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if cuda_available() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> fp32 / bf16 / fp16 (ValueError for others)."""
    for name, known in DTYPES.items():
        if known == dtype:
            return name
    raise ValueError(f"{dtype} is not one of the supported dtypes {sorted(DTYPES)}")


def is_first_rank() -> bool:
    """True on global rank 0, and in a process that is not (yet) part of a process group: the
    rank that prints, writes shared files and builds caches. Before torch.distributed starts, the
    launcher's RANK decides (torchrun sets it), so setup logs appear once."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def parallel_layout() -> tuple:
    """(TP, PP, DP) of this process's model-parallel groups ((1, 1, 1) without them)."""
    if not parallel_state.model_parallel_is_initialized():
        return 1, 1, 1
    return (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_data_parallel_world_size())


def cuda_available() -> bool:
    return torch.cuda.is_available()


def transformer_engine_usable() -> bool:
    """True when Transformer Engine imports and a GPU is present (TE needs CUDA at import)."""
    if not cuda_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def get_device() -> torch.device:
    """The device this rank computes on: its local GPU, or the CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_distributed(timeout_minutes: int = 30) -> None:
    """Create the default process group (idempotent).

    On CPU the entry point must have called `pose_megatron._compat.enable_cpu_fallbacks()` first:
    megatron-core's CUDA-only calls would otherwise fail deep inside the first step.
    """
    if not cuda_available():
        from pose_megatron._compat import cpu_fallbacks_active

        if not cpu_fallbacks_active():
            raise RuntimeError(
                "megatron-core is about to run without CUDA, but the CPU compatibility layer is off; "
                "call pose_megatron._compat.enable_cpu_fallbacks() at the entry point"
            )
    if dist.is_initialized():
        return
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    init_method = "env://"
    if "MASTER_ADDR" not in os.environ:
        if world_size != 1:
            raise RuntimeError(
                "WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun, which sets both."
            )
        # A private rendezvous; not exported, so child processes start their own.
        init_method = f"tcp://127.0.0.1:{_free_port()}"
    if cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend="nccl" if cuda_available() else "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1
) -> None:
    """(Re)build megatron-core's TP / PP / DP groups over the default process group."""
    world_size = dist.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by TP x PP = {tensor_model_parallel_size} x "
            f"{pipeline_model_parallel_size}: change --tensor-model-parallel-size, "
            "--pipeline-model-parallel-size or the number of processes."
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
    )


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch, and megatron-core's tensor-parallel RNG tracker.

    The CPU generator gets the same seed on every rank, so CPU-side initialisation
    (`use_cpu_initialization`) yields the same full weights whatever the TP size; the tracker
    offsets the tensor-parallel stream per TP rank, as megatron-core does.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    # On CPU the tracker drew its states from the CPU generator; restore the plain seed.
    torch.manual_seed(seed)


def destroy() -> None:
    """Tear down model-parallel groups and the process group (end of a run or a test)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
