"""The experiments' tests run megatron-core in-process too (a run of experiments/ alone does not
load tests/conftest.py): on CPU its CUDA-only calls need the stand-ins before any test imports it."""

from pose_megatron._compat import enable_cpu_fallbacks


def pytest_configure(config):
    enable_cpu_fallbacks()
