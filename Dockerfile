# pose_megatron on an NGC PyTorch container. CUDA, cuDNN, torch, Transformer Engine and apex come
# from the image and are kept as they are; pip installs the plugin with the dependencies setup.py
# declares (megatron-core, numpy, sentencepiece, safetensors, psutil, tqdm, matplotlib, packaging).
#   docker build -t pose-megatron .
#   docker run --gpus all --ipc=host -v /data:/data -e DATA_PATH=... -e TOKENIZER_MODEL=... pose-megatron
#
# Base image, and why (docs/gpu.md, "Container"): 25.11 ships Python 3.12, torch 2.10.0a0 and
# Transformer Engine 2.9 (NGC PyTorch release notes, rel-25-11). megatron-core 0.16.1 declares
# transformer-engine[pytorch]>=2.9.0a0,<2.12.0 (its pyproject.toml, "dev" extra, tag core_v0.16.1),
# and its own CI builds that release on this tag (docker/.ngc_version.dev at core_v0.16.1).
FROM nvcr.io/nvidia/pytorch:25.11-py3

# The release the GPU check (benchmarks/gpu/run_h200.py) is prepared for; setup.py must admit it
# (tests/unit/test_packaging.py checks). 0.16.1 has a cp312 wheel on PyPI.
ARG MEGATRON_CORE_VERSION=0.16.1

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /workspace/pose_megatron
COPY setup.py README.md ./
COPY pose_megatron ./pose_megatron
COPY scripts ./scripts
COPY tools ./tools
COPY examples ./examples

# The image's own constraint file (PIP_CONSTRAINT=/etc/pip/constraint.txt) pins every package the
# image ships at its version, so any dependency setup.py needs in a newer version than the image has
# would make the install fail; megatron-core's install guide sets it aside as well. A narrow
# constraint file takes its place: the image's torch, Transformer Engine and apex at their installed
# versions, so pip keeps them or fails, and never swaps in a PyPI build. The last line checks the
# result without importing Transformer Engine (that needs a GPU, which a build does not have).
RUN python scripts/pin_image_stack.py > /tmp/image-stack.txt && cat /tmp/image-stack.txt && \
    PIP_CONSTRAINT= pip install --no-cache-dir -c /tmp/image-stack.txt \
        "megatron-core==${MEGATRON_CORE_VERSION}" -e . && \
    python -c "from importlib.metadata import version as v; print('megatron-core', v('megatron-core'), 'torch', v('torch'), 'matplotlib', v('matplotlib'))"

CMD ["bash", "examples/pretrain_pose_llama.sh"]
