"""RoPE parity with Hugging Face transformers' own functions, including the stock-HF export mapping.

Each scaling type is compared with the transformers computation its HF export would use:
default/linear/yarn/llama3 with themselves, ntk with `default` at rope_theta = ntk_scaled_base, and
PoSE's revised YaRN with `longrope` (short_factor = long_factor = the extension factors). Frequencies
must be bitwise equal: one ulp of inv_freq is ~1e-3 rad of angle at position 16k.
"""

import math

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply_rotary_pos_emb

from pose_megatron.checkpoint.hf_rope import rope_to_hf_parameters
from pose_megatron.rope import (
    PoseRotaryEmbedding,
    RopeScaling,
    compute_inv_freq,
)

HEAD_DIM = 128
L_C = 2048  # training window (original context)


def _hf_config(rope_parameters, max_position_embeddings, head_dim=HEAD_DIM):
    return LlamaConfig(
        vocab_size=32,
        hidden_size=2 * head_dim,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=dict(rope_parameters),
    )


def hf_config_for(scaling: RopeScaling, base: float, head_dim=HEAD_DIM):
    """The stock-HF config that reproduces `scaling`, through the exporter's own mapping."""
    target = int((scaling.original_max_position_embeddings or L_C) * scaling.factor)  # L_t
    return _hf_config(rope_to_hf_parameters(scaling, base, head_dim), target, head_dim)


def _hf_inv_freq(config, **kwargs):
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, **kwargs)


CASES = [
    ("default", RopeScaling("default"), 10000.0),
    ("default-llama3-base", RopeScaling("default"), 500000.0),
    ("linear", RopeScaling("linear", 8.0), 10000.0),
    ("linear-fractional", RopeScaling("linear", 2.5), 10000.0),
    ("ntk", RopeScaling("ntk", 8.0), 10000.0),
    ("ntk-64", RopeScaling("ntk", 64.0), 10000.0),
    ("yarn", RopeScaling("yarn", 8.0, L_C), 10000.0),
    ("yarn-4k-32x", RopeScaling("yarn", 32.0, 4096), 10000.0),
    ("yarn-betas", RopeScaling("yarn", 16.0, 4096, beta_fast=16.0, beta_slow=2.0), 500000.0),
    ("yarn-override", RopeScaling("yarn", 8.0, L_C, attention_factor=1.3), 10000.0),
    ("yarn-revised", RopeScaling("yarn-revised", 8.0, L_C), 10000.0),
    ("yarn-revised-4k-32x", RopeScaling("yarn-revised", 32.0, 4096), 10000.0),
    ("yarn-revised-betas", RopeScaling("yarn-revised", 16.0, 4096, beta_fast=16.0, beta_slow=2.0), 500000.0),
    ("llama3", RopeScaling("llama3", 8.0, 8192), 500000.0),
    ("llama3-custom", RopeScaling("llama3", 4.0, 4096, low_freq_factor=2.0, high_freq_factor=6.0), 500000.0),
]


@pytest.mark.parametrize("name, scaling, base", CASES, ids=[c[0] for c in CASES])
def test_inv_freq_and_attention_factor_match_transformers(name, scaling, base):
    ours, our_af = compute_inv_freq(scaling, HEAD_DIM, base)
    config = hf_config_for(scaling, base)
    hf, hf_af = _hf_inv_freq(config)
    assert hf.dtype == ours.dtype == torch.float32
    torch.testing.assert_close(ours, hf, rtol=0, atol=0)
    assert our_af == pytest.approx(hf_af, rel=1e-12, abs=0)
    if config.rope_parameters["rope_type"] == "longrope":
        # HF picks long_factor once positions exceed L_c: must give the same frequencies.
        hf_long, _ = _hf_inv_freq(config, seq_len=scaling.original_max_position_embeddings * 4)
        torch.testing.assert_close(ours, hf_long, rtol=0, atol=0)


def test_yarn_revised_export_needs_explicit_attention_factor():
    # HF longrope's own default attention factor is sqrt(1 + ln s / ln L_o), not YaRN's 0.1 ln s + 1:
    # an export that omits attention_factor silently changes the logits.
    scaling = RopeScaling("yarn-revised", 8.0, L_C)
    config = hf_config_for(scaling, 10000.0)
    del config.rope_parameters["attention_factor"]
    _, hf_default_af = _hf_inv_freq(config)
    assert hf_default_af == pytest.approx(math.sqrt(1 + math.log(8.0) / math.log(L_C)))
    assert abs(hf_default_af - compute_inv_freq(scaling, HEAD_DIM, 10000.0)[1]) > 0.05


def _pose_positions():
    """Two samples with PoSE-style jumps (different per sample), max position 16383."""
    first = torch.cat([torch.arange(0, 700), torch.arange(700 + 9000, 9000 + L_C)])
    second = torch.cat([torch.arange(0, 1024), torch.arange(1024 + 14336, 14336 + L_C)])
    pos = torch.stack([first, second])  # [2, L_C]
    assert pos.shape == (2, L_C) and pos.max().item() == 16383
    return pos


COS_SIN_CASES = [c for c in CASES if c[0] in ("default", "linear", "ntk", "yarn", "yarn-revised", "llama3")]


@pytest.mark.parametrize("name, scaling, base", COS_SIN_CASES, ids=[c[0] for c in COS_SIN_CASES])
def test_cos_sin_match_transformers_on_pose_positions(name, scaling, base):
    pos = _pose_positions()
    hf_rope = LlamaRotaryEmbedding(hf_config_for(scaling, base))
    x = torch.zeros(1, dtype=torch.float32)
    hf_cos, hf_sin = hf_rope(x, pos)  # [b, s, d], multiplied by HF's attention scaling

    ours = PoseRotaryEmbedding(HEAD_DIM, base, scaling)
    freqs = ours(pos)  # [s, b, 1, d]
    assert freqs.shape == (L_C, 2, 1, HEAD_DIM)
    angles = freqs[:, :, 0, :].transpose(0, 1)  # [b, s, d]
    # The angles themselves are bitwise HF's (same fp32 inv_freq, same single multiply).
    hf_angles = pos[..., None].float() * hf_rope.inv_freq
    torch.testing.assert_close(angles, torch.cat((hf_angles, hf_angles), -1), rtol=0, atol=0)
    af = ours.attention_factor
    torch.testing.assert_close(angles.cos() * af, hf_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(angles.sin() * af, hf_sin, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shared", [False, True], ids=["per-sample", "shared"])
def test_megatron_application_matches_hf_query_rotation(shared):
    """Our freqs through megatron-core's unfused RoPE, times the attention factor, equal HF's rotated q."""
    torch.manual_seed(0)
    scaling = RopeScaling("yarn-revised", 8.0, L_C)
    pos = _pose_positions()[:, ::8]  # [2, 256]
    if shared:
        pos = pos[:1].expand(2, -1).clone()
    b, s, heads = pos.shape[0], pos.shape[1], 2
    q = torch.randn(s, b, heads, HEAD_DIM)  # megatron layout [s, b, h, d]

    ours = PoseRotaryEmbedding(HEAD_DIM, 10000.0, scaling)
    freqs = ours(pos)
    assert freqs.shape[1] == (1 if shared else b)
    q_mcore = _apply_rotary_pos_emb_bshd(q, freqs, rotary_interleaved=False) * ours.attention_factor

    cos, sin = LlamaRotaryEmbedding(hf_config_for(scaling, 10000.0))(q, pos)  # [b, s, d]
    q_hf = q.permute(1, 2, 0, 3)  # HF layout [b, h, s, d]
    q_hf_rot, _ = hf_apply_rotary_pos_emb(q_hf, q_hf, cos, sin)
    torch.testing.assert_close(q_mcore, q_hf_rot.permute(2, 0, 1, 3), rtol=1e-5, atol=1e-5)
