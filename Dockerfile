# pose_megatron on an NGC PyTorch container: CUDA, cuDNN, torch, Transformer Engine and apex come from
# the image and are kept as they are; only megatron-core and the plugin are added.
#   docker build -t pose-megatron .
#   docker run --gpus all --ipc=host -v /data:/data -e DATA_PATH=... -e TOKENIZER_MODEL=... pose-megatron
FROM nvcr.io/nvidia/pytorch:25.04-py3

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /workspace/pose_megatron
COPY setup.py README.md ./
COPY pose_megatron ./pose_megatron
COPY tools ./tools
COPY examples ./examples

# --no-deps on the plugin keeps the container's torch (setup.py's torch>=2.6 is already met);
# megatron-core is pinned to the same release setup.py declares.
RUN pip install --no-cache-dir "megatron-core==0.16.1" numpy sentencepiece safetensors psutil tqdm && \
    pip install --no-cache-dir --no-deps -e .

CMD ["bash", "examples/pretrain_pose_llama.sh"]
