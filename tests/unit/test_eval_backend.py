"""The evaluation backend interface: an interface module importing no implementation, and backends
opened by registered name."""

import subprocess
import sys

import pytest

from pose_megatron.evaluation import backend as interface
from pose_megatron.evaluation.backend import BACKENDS, EvalBackend, open_backend, register_backend


def test_the_interface_imports_no_backend():
    """Importing the package and its interface loads neither implementation (nor megatron-core's
    model code): each is imported when its name is first opened."""
    code = ("import sys, pose_megatron.evaluation, pose_megatron.evaluation.backend; "
            "print(sorted(m for m in sys.modules if m.startswith('pose_megatron') and m.endswith('_backend')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class _Recorded(EvalBackend):
    kind = "recorded"


def test_open_backend_calls_the_registered_opener_with_its_options(monkeypatch):
    monkeypatch.setattr(interface, "BACKENDS", {})  # a registry of this test's own
    seen = {}

    @register_backend("recorded")
    def opener(path, label, options):
        seen.update(path=path, label=label, options=options)
        return _Recorded(label, path)

    assert interface.BACKENDS == {"recorded": opener}
    backend = open_backend("recorded", "/runs/pose/iter_0000100", dtype="fp32", tensor_model_parallel_size=2)
    assert isinstance(backend, _Recorded) and backend.label == "pose/iter_0000100"
    assert seen["options"].dtype == "fp32" and seen["options"].tensor_model_parallel_size == 2
    assert seen["options"].pipeline_model_parallel_size == 1
    with pytest.raises(ValueError, match="already registered"):
        register_backend("recorded")(lambda *a: None)


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown backend kind 'onnx'; use one of \[.*'hf', 'megatron'"):
        open_backend("onnx", "/tmp/x")


def test_builtin_backends_register_under_their_names():
    open_hf = interface.BUILTIN_BACKEND_MODULES["hf"]
    with pytest.raises(FileNotFoundError, match="no config.json"):
        open_backend("hf", "/nonexistent/model")  # imports hf_backend, which registers "hf"
    assert BACKENDS["hf"].__module__ == open_hf
    import pose_megatron.evaluation.megatron_backend as megatron_backend

    assert BACKENDS["megatron"] is megatron_backend.open_megatron_backend


def test_a_backend_without_a_hook_says_which_one_it_lacks():
    backend = _Recorded("r", "memory")
    with pytest.raises(NotImplementedError, match="recorded backend cannot generate"):
        backend.greedy_generate([1, 2], 3)
    with pytest.raises(NotImplementedError, match="recorded backend cannot score windows"):
        backend._score([])
