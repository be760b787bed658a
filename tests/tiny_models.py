"""Tiny random LLaMA models shared by the parity tests (no downloads: built from configs)."""

from __future__ import annotations

import torch

from pose_megatron.checkpoint.hf_config import rope_to_hf_parameters
from pose_megatron.config import ModelConfig, build_transformer_config
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


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """HF q/k/v projections -> megatron's fused QKV: per query group, its q heads then k then v."""
    d, groups = cfg.head_dim, cfg.num_query_groups
    per_group = cfg.num_attention_heads // groups
    q = q.view(groups, per_group * d, -1)
    k = k.view(groups, d, -1)
    v = v.view(groups, d, -1)
    return torch.cat([q, k, v], dim=1).reshape(-1, q.size(-1))


def copy_hf_into_pose(hf_model, pose_model, cfg: ModelConfig) -> None:
    """Load a HF LLaMA's weights into a PoseGPTModel at TP=PP=1 (local layer spec)."""
    hf = hf_model.state_dict()
    vocab_pad = pose_model.embedding.word_embeddings.weight.shape[0]

    def padded(w):
        return torch.cat([w, w.new_zeros(vocab_pad - w.shape[0], w.shape[1])])

    ours = {
        "embedding.word_embeddings.weight": padded(hf["model.embed_tokens.weight"]),
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
        "output_layer.weight": padded(hf["lm_head.weight"]),
    }
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        ours[dst + "input_layernorm.weight"] = hf[src + "input_layernorm.weight"]
        ours[dst + "pre_mlp_layernorm.weight"] = hf[src + "post_attention_layernorm.weight"]
        ours[dst + "self_attention.linear_qkv.weight"] = fuse_qkv(
            hf[src + "self_attn.q_proj.weight"], hf[src + "self_attn.k_proj.weight"],
            hf[src + "self_attn.v_proj.weight"], cfg,
        )
        ours[dst + "self_attention.linear_proj.weight"] = hf[src + "self_attn.o_proj.weight"]
        ours[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]]
        )
        ours[dst + "mlp.linear_fc2.weight"] = hf[src + "mlp.down_proj.weight"]
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
