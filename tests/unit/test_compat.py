"""The CPU compatibility layer: every call site it covers still exists, and it refuses releases it
was not checked against."""

import importlib
import inspect
import re

import pytest

from pose_megatron import _compat
from pose_megatron._compat import cpu


@pytest.mark.parametrize("module_name", sorted(cpu.PATCHED_MODULES))
def test_every_patched_module_still_has_its_cuda_call_site(module_name):
    _, pattern = cpu.PATCHED_MODULES[module_name]
    module = importlib.import_module(module_name)
    assert hasattr(module, "torch"), f"{module_name} no longer imports torch as a module name"
    assert re.search(pattern, inspect.getsource(module)), (
        f"{module_name} no longer has the call site {pattern!r}: re-check the CPU stand-ins")


@pytest.mark.parametrize("module_name, attribute, pattern", cpu.REPLACED_FUNCTIONS)
def test_every_replaced_function_and_type_check_still_exists(module_name, attribute, pattern):
    module = importlib.import_module(module_name)
    assert hasattr(module, attribute), f"{module_name}.{attribute} is gone"
    assert re.search(pattern, inspect.getsource(module)), f"{module_name}: {pattern!r} not found"


def test_applied_by_the_conftest_and_idempotent():
    assert _compat.cpu_fallbacks_active()
    schedules = importlib.import_module("megatron.core.pipeline_parallel.schedules")
    stand_in = schedules.torch
    assert _compat.enable_cpu_fallbacks() is True
    assert schedules.torch is stand_in  # a second call changes nothing
    assert stand_in.zeros(2, device="cuda").device.type == "cpu"


def test_other_megatron_core_releases_are_refused_with_the_fix():
    assert _compat.check_cpu_version("0.16.1") == "0.16.1"
    with pytest.raises(_compat.UnsupportedMegatronCore, match=r"megatron-core 0\.99\.0 is installed.*"
                       r"pip install megatron-core=="):
        _compat.check_cpu_version("0.99.0")


def test_initialize_distributed_refuses_cpu_without_the_layer(monkeypatch):
    from pose_megatron import runtime

    monkeypatch.setattr(_compat, "cpu_fallbacks_active", lambda: False)
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="enable_cpu_fallbacks"):
        runtime.initialize_distributed()
