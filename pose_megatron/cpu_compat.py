"""Let megatron-core 0.16.1 run on a machine without CUDA.

megatron-core has no CPU path: a handful of its modules call `torch.cuda.*` or allocate with
`device="cuda"` directly. Rather than patching torch for the whole process, each of those modules gets
its own stand-in for the name `torch`: it delegates everything to the real torch, except that CUDA
devices become the CPU, CUDA streams and synchronisation become no-ops, and the CUDA RNG becomes the
CPU RNG (the RNG tracker then forks the generator CPU kernels actually use).

`apply()` is idempotent and is called by `runtime.initialize_distributed` only when CUDA is absent.
Every entry of `_PATCHED_MODULES` names the call sites it covers; one no test needs is dropped.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch

_APPLIED = False

# Tensor factories that megatron-core calls with device="cuda" / torch.cuda.current_device().
_FACTORIES = frozenset({"zeros", "ones", "empty", "tensor", "full", "arange"})


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, int):
        return True  # an int device is a CUDA ordinal
    return str(device).startswith("cuda")


def _cpu_factory(factory):
    def make(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    make.__name__ = factory.__name__
    return make


class _NullStream:
    """Stands in for torch.cuda.Stream / Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


class _CudaOnCpu:
    """Stands in for `torch.cuda` inside a patched megatron-core module."""

    Stream = _NullStream
    Event = _NullStream

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def is_available():
        return False

    @staticmethod
    def synchronize(*args, **kwargs):
        pass

    @staticmethod
    def empty_cache():
        pass

    @staticmethod
    def stream(*args, **kwargs):
        return contextlib.nullcontext()

    @staticmethod
    def current_stream(*args, **kwargs):
        return _NullStream()

    default_stream = current_stream

    # The CUDA RNG maps to the CPU RNG, which is what CPU dropout and init draw from.
    get_rng_state = staticmethod(torch.get_rng_state)
    manual_seed = staticmethod(torch.manual_seed)

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchOnCpu(types.ModuleType):
    """Stands in for `torch` inside a patched megatron-core module."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCpu()

    def __getattr__(self, name):
        attr = getattr(torch, name)
        return _cpu_factory(attr) if name in _FACTORIES else attr


@contextlib.contextmanager
def _cuda_type_names():
    """While active, CPU tensors' `.type()` reports the CUDA name (torch.FloatTensor ->
    torch.cuda.FloatTensor). megatron-core dispatches on those names in the distributed optimizer
    and asserts them in gradient clipping; a string test on a Tensor method cannot be redirected
    per module, so this is scoped to exactly those calls (see apply())."""
    original = torch.Tensor.type

    def cuda_named_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = cuda_named_type
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    return wrapper


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


# module -> the call sites its `torch` stand-in covers.
_PATCHED_MODULES = {
    # RotaryEmbedding moves inv_freq to torch.cuda.current_device() (stock GPTModel in parity tests).
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "inv_freq .to(cuda)",
    # model_parallel_cuda_manual_seed and the RNG tracker: torch.cuda.manual_seed / get_rng_state.
    "megatron.core.tensor_parallel.random": "cuda RNG seeding",
    # GlobalMemoryBuffer.get_tensor allocates on torch.cuda.current_device() (local DotProductAttention).
    "megatron.core.utils": "global memory buffer device",
    # get_default_causal_mask allocates on "cuda" (local-spec DotProductAttention).
    "megatron.core.transformer.utils": "causal mask device",
    # total_num_tokens = torch.zeros(..., device="cuda") in every schedule.
    "megatron.core.pipeline_parallel.schedules": "token counter device",
    # shape exchange buffers on torch.cuda.current_device(); torch.cuda.synchronize after batched p2p.
    "megatron.core.pipeline_parallel.p2p_communication": "p2p buffers and sync",
    # torch.cuda.synchronize before copying tensors out for a (sync or async) checkpoint save.
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "save preload sync",
    # the save's reuse check all-reduces a flag created on "cuda".
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "save flag device",
    # grad buffers on torch.cuda.current_device(); communication streams.
    "megatron.core.distributed.param_and_grad_buffer": "grad buffer device, streams",
    # torch.cuda.Stream for grad sync; torch.cuda.synchronize.
    "megatron.core.distributed.distributed_data_parallel": "DDP streams",
    # found_inf / loss-scale tensors created on "cuda".
    "megatron.core.optimizer.optimizer": "optimizer flag tensors",
    # total-norm all-reduce buffers on "cuda".
    "megatron.core.optimizer.clip_grads": "grad-norm buffers",
    # shard buffers on torch.cuda.current_device().
    "megatron.core.optimizer.distrib_optimizer": "distributed optimizer buffers",
}


def apply() -> None:
    """Redirect megatron-core's CUDA-only call sites to the CPU (once per process)."""
    global _APPLIED
    if _APPLIED:
        return
    stand_in = _TorchOnCpu()
    for name in _PATCHED_MODULES:
        module = importlib.import_module(name)
        module.torch = stand_in
    # The tracker's fork() swaps states through these two module-level helpers.
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random._get_cuda_rng_state = _cpu_get_rng_state
    random._set_cuda_rng_state = _cpu_set_rng_state
    # `.type() == 'torch.cuda.FloatTensor'` dispatch and asserts (see _cuda_type_names).
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    optimizer.clip_grad_by_total_norm_fp32 = _with_cuda_type_names(
        optimizer.clip_grad_by_total_norm_fp32)
    distrib = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    distrib.DistributedOptimizer.__init__ = _with_cuda_type_names(
        distrib.DistributedOptimizer.__init__)
    _APPLIED = True
