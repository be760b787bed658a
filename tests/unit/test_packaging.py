"""Packaging facts that images and CI rely on (the Docker image cannot be built here)."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _pin(text: str, package: str) -> str:
    match = re.search(rf"{package}==([0-9][0-9.]*)", text)
    assert match, f"no {package}== pin"
    return match.group(1)


def test_dockerfile_megatron_pin_matches_setup_py():
    setup = (REPO / "setup.py").read_text()
    docker = (REPO / "Dockerfile").read_text()
    assert _pin(docker, "megatron-core") == _pin(setup, "megatron-core") == "0.16.1"
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3$", docker, re.M), "pinned NGC tag"
    # The container's own torch must survive: the plugin installs without dependencies.
    assert "--no-deps -e ." in docker


def test_setup_never_pins_a_cpu_only_torch():
    setup = (REPO / "setup.py").read_text()
    assert '"torch>=2.6"' in setup and "torch==" not in setup
