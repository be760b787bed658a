#!/usr/bin/env python3
"""Print a pip constraints file that holds this environment's torch, Transformer Engine and apex.

The Dockerfile installs the plugin with its declared dependencies (setup.py) under these
constraints: a container's torch, Transformer Engine and apex are built together for its CUDA, so
pip must fail rather than replace them. Exact pins (local versions such as 2.10.0a0+b4e4ee81d3
included) let pip keep what is installed; packages that are absent are left out.

    python scripts/pin_image_stack.py > /tmp/image-stack.txt
    pip install -c /tmp/image-stack.txt -e .
"""

from importlib import metadata

KEPT = ("torch", "transformer-engine", "transformer-engine-cu12", "transformer-engine-cu13",
        "transformer-engine-torch", "apex")
"""Distribution names (normalised) that the image provides and pip must not change."""


def normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def image_stack_constraints() -> list:
    """`name==version` for each installed distribution of KEPT, sorted."""
    pins = set()
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and normalise(name) in KEPT:
            pins.add(f"{normalise(name)}=={dist.version}")
    return sorted(pins)


if __name__ == "__main__":
    pins = image_stack_constraints()
    if not any(p.startswith("torch==") for p in pins):
        raise SystemExit("pin_image_stack.py: no torch is installed here, so there is nothing to "
                         "keep; install the plugin where the image's torch is")
    print("\n".join(pins))
