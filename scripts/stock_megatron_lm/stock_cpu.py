"""Run stock Megatron-LM's own training and checkpoint code (megatron/training, tag core_v0.16.1) on CPU.

Used by the manual scripts beside it, never by pose_megatron itself: they need a Megatron-LM source
tree (git clone --branch core_v0.16.1 https://github.com/NVIDIA/Megatron-LM), given by path, and its
pure-Python dependency `six` (pip install six, or a directory given with --pythonpath).

Import arrangement: `megatron` is a namespace package in the megatron-core wheel and in the tree, so
the tree is APPENDED to sys.path: megatron.core comes from the installed wheel (byte-identical to the
tree's at that tag) and megatron.training from the tree. `use_tree` asserts it.

What stock Megatron-LM needs on a machine without CUDA (each was shown necessary by leaving it out):
- pose_megatron._compat's CPU stand-ins, and the same stand-in as `torch` in the megatron.training
  modules (checkpointing, training, utils) and in megatron.core.timers / rerun_state_machine, which
  call torch.cuda directly (its RNG capture, read_metadata's tensor on "cuda", timers' synchronize);
- a stub for megatron.core.transformer.custom_layers.batch_invariant_kernels (imports triton);
- megatron.training.initialize seeing one "device", so it builds the model-parallel groups and the
  RNG tracker; no compilation of dataset helpers (prebuilt in the wheel) or fused kernels (nvcc);
- a model whose `.cuda()` is a no-op and a batch reader without `Tensor.cuda()`;
- with the distributed optimizer, around load_checkpoint: one optimizer step first (it asserts a
  single Adam step over an empty state), the load under no_grad (fp32 main params are views of the
  parameters), and afterwards one `step` tensor per parameter holding the saved step (it shares
  one, and fills it with the pre-load step). pose_megatron/checkpoint/optimizer_state.py handles
  the same faults on this project's side.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types

FLAGS_FOR_CPU = [
    "--use-cpu-initialization", "--distributed-backend", "gloo", "--transformer-impl", "local",
    "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion",
    "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-persist-layer-norm",
]
"""Stock flags a CPU run needs: no CUDA kernels, CPU initialisation, gloo."""

_STOCK_TORCH_USERS = (
    "megatron.training.checkpointing",
    "megatron.training.training",
    "megatron.training.utils",
    "megatron.core.timers",
    "megatron.core.rerun_state_machine",
)


def use_tree(tree: str, extra_paths=()) -> None:
    """Put the Megatron-LM tree (and extra dependency directories) after site-packages."""
    tree = os.path.abspath(tree)
    if not os.path.isfile(os.path.join(tree, "megatron", "training", "checkpointing.py")):
        raise SystemExit(f"{tree} is no Megatron-LM source tree (no megatron/training/checkpointing.py)")
    for path in (tree, *map(os.path.abspath, extra_paths)):
        if path not in sys.path:
            sys.path.append(path)
    import megatron.core
    import megatron.training

    core, training = (os.path.realpath(m.__file__) for m in (megatron.core, megatron.training))
    assert not core.startswith(os.path.realpath(tree)), f"megatron.core must be the wheel's: {core}"
    assert training.startswith(os.path.realpath(tree)), f"megatron.training must be the tree's: {training}"


def _stub_batch_invariant_kernels() -> None:
    name = "megatron.core.transformer.custom_layers.batch_invariant_kernels"
    stub = types.ModuleType(name)

    def enable_batch_invariant_mode(*args, **kwargs):
        raise NotImplementedError("--batch-invariant-mode needs triton (stubbed on CPU)")

    stub.enable_batch_invariant_mode = enable_batch_invariant_mode
    sys.modules.setdefault(name, stub)


def apply(tree: str, extra_paths=()) -> None:
    """Everything stock megatron.training needs before initialize_megatron, on CPU."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(name, value)
    _stub_batch_invariant_kernels()
    use_tree(tree, extra_paths)
    import importlib

    from pose_megatron._compat import cpu as compat_cpu
    from pose_megatron._compat import enable_cpu_fallbacks

    if not enable_cpu_fallbacks():
        raise SystemExit("these scripts run stock Megatron-LM on a machine without CUDA")
    stand_in = importlib.import_module("megatron.core.pipeline_parallel.schedules").torch
    for name in _STOCK_TORCH_USERS:
        importlib.import_module(name).torch = stand_in

    class _OneDevice(compat_cpu._CudaOnCpu):
        @staticmethod
        def device_count():
            return 1

        @staticmethod
        def set_device(*args, **kwargs):
            pass

    initialize = importlib.import_module("megatron.training.initialize")
    initialize.torch = compat_cpu._TorchOnCpu()
    initialize.torch.cuda = _OneDevice()
    initialize._compile_dependencies = lambda: None


def cpu_model_provider(model_provider, builder):
    """Stock's model_provider(builder, ...) with a model whose `.cuda()` leaves it on the CPU."""

    def provider(*args, **kwargs):
        model = model_provider(builder, *args, **kwargs)
        model.cuda = types.MethodType(lambda self, *a, **k: self, model)
        return model

    return provider


def _batch_on_cpu(data_iterator, mtp_on_this_rank: bool = False):
    """get_batch_on_this_tp_rank at TP=1, without moving the batch to CUDA."""
    if data_iterator is None:
        return None
    data = next(data_iterator)
    return {key: data.get(key) for key in
            ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")}


def patch_pretrain_gpt(pretrain_gpt) -> None:
    from megatron.core import mpu

    assert mpu.get_tensor_model_parallel_world_size() == 1, "the CPU batch reader is TP=1 only"
    pretrain_gpt.get_batch_on_this_tp_rank = _batch_on_cpu


def load_checkpoint_on_cpu(model, optimizer, scheduler):
    """Stock load_checkpoint, with the three distributed-optimizer workarounds (module docstring)."""
    import torch
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.training import get_args
    from megatron.training.checkpointing import load_checkpoint

    args = get_args()
    distributed = args.use_distributed_optimizer and optimizer is not None and not args.no_load_optim
    if distributed:
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        optimizer.step()
    with torch.no_grad() if distributed else contextlib.nullcontext():
        iteration, flops = load_checkpoint(model, optimizer, scheduler)
    if distributed:
        # One step tensor per parameter, holding the checkpoint's step: stock shares one tensor and
        # then overwrites it with the pre-load step (1, from the step above). Every iteration of
        # an fp32 run is one Adam step.
        for part in getattr(optimizer, "chained_optimizers", [optimizer]):
            if isinstance(part, DistributedOptimizer):
                for state in part.optimizer.state.values():
                    if isinstance(state.get("step"), torch.Tensor):
                        state["step"] = torch.tensor(float(iteration))
    return iteration, flops
