"""Shared fixtures: a single-process megatron-core environment (gloo, TP=PP=1) for in-process tests."""

import pytest
import torch

from pose_megatron._compat import enable_cpu_fallbacks


def pytest_configure(config):
    # The suite runs megatron-core in-process; on CPU its CUDA-only calls need the stand-ins.
    enable_cpu_fallbacks()


@pytest.fixture(scope="session")
def megatron_env():
    """torch.distributed (one gloo process) and megatron-core's parallel groups at TP=PP=1."""
    from pose_megatron import runtime

    runtime.initialize_distributed()
    runtime.initialize_model_parallel(1, 1)
    runtime.set_seed(1234)
    yield
    runtime.destroy()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; CPU tests cover the same logic")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
