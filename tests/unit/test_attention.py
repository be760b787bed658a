"""PoseSDPAttention computes exactly what megatron-core's local DotProductAttention computes."""

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from pose_megatron.model import build_transformer_config
from pose_megatron.model import PoseSDPAttention
from tiny_models import TINY


@pytest.mark.parametrize("softmax_scale", [None, 0.3])
def test_sdpa_matches_megatron_local_attention(megatron_env, softmax_scale):
    config = build_transformer_config(TINY)
    args = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                attention_type="self", softmax_scale=softmax_scale)
    ours, stock = PoseSDPAttention(**args), DotProductAttention(**args)
    s, b, d = 40, 3, TINY.head_dim
    g = torch.Generator().manual_seed(0)
    q = torch.randn(s, b, TINY.num_attention_heads, d, generator=g)
    k = torch.randn(s, b, TINY.num_query_groups, d, generator=g)  # grouped-query keys
    v = torch.randn(s, b, TINY.num_query_groups, d, generator=g)
    expected = stock(q, k, v, None)  # [s, b, np * d]
    got = ours(q, k, v, None)
    assert got.shape == expected.shape == (s, b, TINY.num_attention_heads * d)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_sdpa_honours_an_explicit_megatron_mask(megatron_env):
    """Megatron masks are True where attention is blocked; a padded key must get no weight."""
    config = build_transformer_config(TINY)
    attn = PoseSDPAttention(config, 1, AttnMaskType.causal, "self")
    s, b, d = 8, 1, TINY.head_dim
    q = torch.randn(s, b, TINY.num_attention_heads, d)
    k = torch.randn(s, b, TINY.num_query_groups, d)
    v = torch.randn(s, b, TINY.num_query_groups, d)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    out = attn(q, k, v, causal)
    torch.testing.assert_close(out, attn(q, k, v, None), atol=1e-6, rtol=0)
    v_changed = v.clone()
    v_changed[3] += 100.0  # only key 3's value changes
    blocked = causal.clone()
    blocked[..., 3] = True  # and key 3 is masked for every query
    blocked[..., 0, 0] = False  # (query 0 keeps one key to attend to)
    torch.testing.assert_close(attn(q, k, v, blocked), attn(q, k, v_changed, blocked))


def test_transformer_engine_spec_is_asked_for_with_arguments_it_takes(monkeypatch):
    """The TE spec cannot be built without TE, but the call can be checked against megatron-core's
    own signature (an unknown keyword would only fail on a GPU)."""
    import inspect

    from megatron.core.models.gpt import gpt_layer_specs

    from pose_megatron.model import get_layer_spec

    real = inspect.signature(gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec)
    built = object()

    def checked(*args, **kwargs):
        real.bind(*args, **kwargs)  # TypeError for arguments megatron-core does not take
        return built

    monkeypatch.setattr(gpt_layer_specs, "get_gpt_layer_with_transformer_engine_spec", checked)
    assert get_layer_spec(use_transformer_engine=True) is built
