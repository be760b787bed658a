"""pose_megatron: PoSE (positional skip-wise training) as a plugin for megatron-core."""

from setuptools import find_packages, setup

setup(
    name="pose_megatron",
    version="0.1.0",
    description="PoSE context-window extension for megatron-core LLaMA-style models",
    python_requires=">=3.10",
    packages=find_packages(include=["pose_megatron", "pose_megatron.*"]),
    install_requires=[
        # The releases the whole suite ran against (README, "megatron-core releases"): 0.16.1 is the
        # newest for Python 3.11 (CI); 0.17.1, 0.18.2 and 0.19.2 need Python 3.12. Others are excluded.
        "megatron-core>=0.16.1,<=0.19.2,!=0.17.0,!=0.18.0,!=0.19.0",
        # Never a CPU-only pin: GPU users and NGC containers bring their own CUDA torch.
        "torch>=2.6",
        "numpy",
        "sentencepiece",
        "safetensors",
        "psutil",  # dist_checkpointing's async save
        "tqdm",
        "matplotlib",  # evaluation plots (perplexity curves, passkey heatmaps)
        "packaging",
    ],
    extras_require={
        # gguf: llama.cpp's own GGUF reader/writer (tools/export_gguf.py); its constants name the keys.
        "export": ["gguf==0.19.0"],
        "test": ["pytest", "transformers==5.24.0", "scipy", "gguf==0.19.0"],
        "gpu": ["transformer-engine[pytorch]"],
    },
)
