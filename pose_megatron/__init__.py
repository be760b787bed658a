"""PoSE (positional skip-wise training) for megatron-core.

Modules: `rope` (RoPE scaling), `positions` (the PoSE sampler), `data` (PoseGPTDataset),
`model` (PoseGPTModel), `runtime` (distributed init), `config` (presets and CLI mapping).
"""

__version__ = "0.1.0"
