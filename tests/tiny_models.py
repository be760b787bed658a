"""Tiny random LLaMA models shared by the parity tests (no downloads: built from configs)."""

from __future__ import annotations

import torch

from pose_megatron.checkpoint.families import FAMILIES
from pose_megatron.checkpoint.hf_rope import rope_to_hf_parameters
from pose_megatron.checkpoint.weights import hf_to_megatron_state_dict
from pose_megatron.model import build_transformer_config
from pose_megatron.presets import ModelConfig
from pose_megatron.model import build_model
from pose_megatron.rope import RopeScaling

TINY = ModelConfig(
    num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
    vocab_size=256, max_position_embeddings=64, rotary_base=10000.0, norm_epsilon=1e-5,
)

# One RopeScaling per type, with the tiny model's window as the original length.
ROPE_CASES = {
    "default": RopeScaling("default"),
    "linear": RopeScaling("linear", factor=8.0),
    "ntk": RopeScaling("ntk", factor=8.0),
    "yarn": RopeScaling("yarn", factor=8.0, original_max_position_embeddings=64),
    "yarn-revised": RopeScaling("yarn-revised", factor=8.0, original_max_position_embeddings=64),
    "llama3": RopeScaling("llama3", factor=8.0, original_max_position_embeddings=64,
                          low_freq_factor=1.0, high_freq_factor=4.0),
}

# Every RoPE an export must carry: one per type, plus the YaRN settings only some readers honour.
EXPORT_ROPE_CASES = {
    **ROPE_CASES,
    "yarn-betas": RopeScaling("yarn", 8.0, 64, beta_fast=8.0, beta_slow=2.0),
    "yarn-attention-factor": RopeScaling("yarn", 8.0, 64, attention_factor=1.5),
}


def hf_llama(cfg: ModelConfig, scaling: RopeScaling, seed: int = 0):
    """A random transformers LlamaForCausalLM (fp32, eager attention) with our RoPE as stock params."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_query_groups,
        rms_norm_eps=cfg.norm_epsilon, tie_word_embeddings=False,
        max_position_embeddings=int(cfg.max_position_embeddings * scaling.factor),
        rope_parameters=rope_to_hf_parameters(scaling, cfg.rotary_base, cfg.head_dim),
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # HF's init leaves norms at 1; randomise them so the copy is tested.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def copy_hf_into_pose(hf_model, pose_model, cfg: ModelConfig) -> None:
    """Load a HF LLaMA's weights into a PoseGPTModel at TP=PP=1 (local layer spec), through the
    converters' own weight mapping (pose_megatron.checkpoint.weights)."""
    vocab_pad = pose_model.embedding.word_embeddings.weight.shape[0]
    ours = hf_to_megatron_state_dict(FAMILIES["llama"], cfg, hf_model.state_dict(), vocab_pad)
    missing, unexpected = pose_model.load_state_dict(ours, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    assert not missing and not unexpected, (missing, unexpected)


def pose_llama(cfg: ModelConfig, scaling: RopeScaling, **config_overrides):
    """A PoseGPTModel at the current parallel sizes (megatron-core must be initialised)."""
    from megatron.core import parallel_state as ps

    tconfig = build_transformer_config(
        cfg,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        **config_overrides,
    )
    return build_model(
        cfg, tconfig, scaling,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
    )


def pose_positions(batch: int, seq: int, target: int, seed: int = 0) -> torch.Tensor:
    """Two-chunk PoSE-style positions [batch, seq], different per sample (independent of the sampler)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        cut = int(torch.randint(1, seq // 2 + 1, (1,), generator=g))
        skip = int(torch.randint(0, target - seq + 1, (1,), generator=g))
        pos = torch.arange(seq)
        pos[cut:] += skip
        rows.append(pos)
    return torch.stack(rows)
