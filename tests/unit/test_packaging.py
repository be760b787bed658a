"""Packaging facts that images and CI rely on (the Docker image cannot be built here)."""

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]

IMAGE_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.0"}
"""The NGC image's Python (docs/gpu.md, "Container"), for environment markers in setup.py."""


def _setup_requirements(package: str) -> list:
    """setup.py's requirements on `package` that apply on the image's Python."""
    setup = (REPO / "setup.py").read_text()
    requirements = [Requirement(r) for r in re.findall(r'"([A-Za-z0-9_.\-]+ *[<>=!~][^"]*)"', setup)]
    applicable = [r for r in requirements if r.name == package
                  and (r.marker is None or r.marker.evaluate(IMAGE_PYTHON))]
    assert applicable, f"setup.py declares no {package} requirement for Python 3.12"
    return applicable


def _docker_megatron_pin(docker: str) -> str:
    match = re.search(r"^ARG MEGATRON_CORE_VERSION=([0-9][0-9.]*)$", docker, re.M)
    assert match, "the Dockerfile pins megatron-core in ARG MEGATRON_CORE_VERSION"
    assert '"megatron-core==${MEGATRON_CORE_VERSION}"' in docker, "the pin is what pip installs"
    return match.group(1)


def test_dockerfile_megatron_pin_is_admitted_by_setup_py():
    docker = (REPO / "Dockerfile").read_text()
    pin = _docker_megatron_pin(docker)
    for requirement in _setup_requirements("megatron-core"):
        assert requirement.specifier.contains(pin), (
            f"setup.py admits megatron-core {requirement.specifier}, the image pins {pin}")
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3$", docker, re.M), "pinned NGC tag"


def test_dockerfile_installs_the_declared_dependencies_keeping_the_image_stack():
    docker = (REPO / "Dockerfile").read_text()
    found = re.search(r"PIP_CONSTRAINT= pip install(?:[^\n\\]|\\\n)*", docker)
    assert found, "the Dockerfile installs with pip, the image's own constraint set aside"
    install = found.group(0).split("&&")[0]  # the pip command alone, not the check after it
    # With dependencies (matplotlib and packaging come from setup.py, not from a list here) ...
    assert "--no-deps" not in docker and re.search(r"\s-e \.(\s|$)", install), install
    for name in ("numpy", "sentencepiece", "matplotlib", "safetensors"):
        assert name not in install, f"{name} is listed by hand instead of coming from setup.py"
    # ... under the constraint file that holds the image's torch, Transformer Engine and apex.
    assert "scripts/pin_image_stack.py > /tmp/image-stack.txt" in docker
    assert "-c /tmp/image-stack.txt" in install
    setup = (REPO / "setup.py").read_text()
    assert '"matplotlib' in setup and '"packaging' in setup


def test_image_stack_constraints_pin_the_installed_torch():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "pin_image_stack.py")],
                         capture_output=True, text=True, check=True).stdout.split()
    assert f"torch=={metadata.version('torch')}" in out
    names = {line.split("==")[0] for line in out}
    assert names <= {"torch", "transformer-engine", "transformer-engine-cu12", "transformer-engine-cu13",
                     "transformer-engine-torch", "apex"}, names


def test_setup_never_pins_a_cpu_only_torch():
    setup = (REPO / "setup.py").read_text()
    assert '"torch>=2.6"' in setup and "torch==" not in setup


def test_setup_py_admits_exactly_the_megatron_core_releases_the_suite_ran_against():
    from pose_megatron._compat import CPU_TESTED_MEGATRON_CORE

    (requirement,) = _setup_requirements("megatron-core")
    released = ["0.15.3", "0.16.0", "0.16.1", "0.17.0", "0.17.1", "0.18.0", "0.18.2", "0.19.0", "0.19.2",
                "0.20.0"]
    admitted = [version for version in released if requirement.specifier.contains(version)]
    assert admitted == list(CPU_TESTED_MEGATRON_CORE)
