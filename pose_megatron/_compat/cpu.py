"""The stand-ins that let megatron-core run on a machine without CUDA (see pose_megatron._compat).

megatron-core has no CPU path: a handful of its modules call `torch.cuda.*` or allocate with
`device="cuda"` directly. Rather than patching torch for the whole process, each of those modules gets
its own stand-in for the name `torch`: it delegates everything to the real torch, except that CUDA
devices become the CPU, CUDA streams and synchronisation become no-ops, and the CUDA RNG becomes the
CPU RNG (the RNG tracker then forks the generator CPU kernels actually use).

`apply()` is idempotent. Every entry of `PATCHED_MODULES` says which call sites it covers and
carries a pattern of one of them, which tests/unit/test_compat.py checks against megatron-core.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch

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


# module -> (what its `torch` stand-in covers, a regex matching one such call site in its source).
# tests/unit/test_compat.py checks every regex against the installed megatron-core, so a release
# that moves a call site fails that test rather than a training run.
PATCHED_MODULES = {
    "megatron.core.models.common.embeddings.rotary_pos_embedding":
        ("RotaryEmbedding moves inv_freq to the CUDA device (stock GPTModel in parity tests)",
         r"inv_freq\.to\(device=torch\.cuda\.current_device\(\)\)"),
    "megatron.core.tensor_parallel.random":
        ("model_parallel_cuda_manual_seed and the RNG tracker seed the CUDA generator",
         r"torch\.cuda\.manual_seed"),
    "megatron.core.utils":
        ("GlobalMemoryBuffer allocates on the CUDA device (local DotProductAttention)",
         r"device=torch\.cuda\.current_device\(\)"),
    "megatron.core.transformer.utils":
        ("get_default_causal_mask allocates on \"cuda\" (local-spec DotProductAttention)",
         r"torch\.ones\(sq, sq, device=\"cuda\"\)"),
    "megatron.core.pipeline_parallel.schedules":
        ("every schedule's token counter is created on \"cuda\"",
         r"total_num_tokens = torch\.zeros\(\[\], dtype=torch\.int, device=\"cuda\"\)"),
    "megatron.core.pipeline_parallel.p2p_communication":
        ("shape exchange buffers on the CUDA device; synchronize after batched p2p",
         r"device=torch\.cuda\.current_device\(\)"),
    "megatron.core.dist_checkpointing.strategies.filesystem_async":
        ("synchronize before copying tensors out for a checkpoint save",
         r"torch\.cuda\.synchronize\(\)"),
    "megatron.core.dist_checkpointing.strategies.state_dict_saver":
        ("the save's reuse check all-reduces a flag created on \"cuda\"",
         r"device='cuda'"),
    "megatron.core.distributed.param_and_grad_buffer":
        ("grad buffers on the CUDA device; communication streams",
         r"torch\.cuda\.(default|current)_stream\(\)"),  # 0.17 moved to current_stream
    "megatron.core.distributed.distributed_data_parallel":
        ("a CUDA stream for grad sync; synchronize",
         r"torch\.cuda\.Stream\("),
    "megatron.core.optimizer.optimizer":
        ("found_inf / loss-scale tensors created on \"cuda\"",
         r"self\.found_inf = torch\.tensor\(\[0\.0\], dtype=torch\.float, device='cuda'\)"),
    "megatron.core.optimizer.clip_grads":
        ("total-norm all-reduce buffers on \"cuda\"",
         r"total_norm_cuda = torch\.tensor\("),
    "megatron.core.optimizer.distrib_optimizer":
        ("shard buffers on the CUDA device",
         r"torch\.cuda\.current_device\(\)"),
}

# Module-level functions replaced outright, and the string checks scoped by _cuda_type_names:
# (module, attribute, a regex of the call site it serves).
REPLACED_FUNCTIONS = (
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", r"def _get_cuda_rng_state\("),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", r"def _set_cuda_rng_state\("),
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32",
     r"clip_grad_by_total_norm_fp32\("),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32",
     r"param\.grad\.type\(\) == 'torch\.cuda\.FloatTensor'"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer",
     r"model_param\.type\(\) == 'torch\.cuda\.FloatTensor'"),
)


_MARKER_MODULE = "megatron.core.pipeline_parallel.schedules"


def is_applied() -> bool:
    """Whether this process's megatron-core modules already use the stand-ins (read off the
    patched modules themselves, so there is no separate flag to get out of step)."""
    import sys

    module = sys.modules.get(_MARKER_MODULE)
    return module is not None and isinstance(getattr(module, "torch", None), _TorchOnCpu)


def apply() -> None:
    """Redirect megatron-core's CUDA-only call sites to the CPU (idempotent)."""
    if is_applied():
        return
    stand_in = _TorchOnCpu()
    for name in PATCHED_MODULES:
        if name != _MARKER_MODULE:
            importlib.import_module(name).torch = stand_in
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
    # Last, so that is_applied() implies all of the above.
    importlib.import_module(_MARKER_MODULE).torch = stand_in
