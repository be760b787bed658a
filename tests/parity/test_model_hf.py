"""PoseGPTModel against Hugging Face LlamaForCausalLM and against stock megatron-core GPTModel."""

import pytest
import torch
import torch.nn.functional as F

from tiny_models import ROPE_CASES, TINY, copy_hf_into_pose, hf_llama, pose_llama, pose_positions

SEQ, BATCH = 48, 3
TARGET = TINY.max_position_embeddings * 8  # positions reach 8x the window, as PoSE trains


def _logits(model, tokens, positions):
    with torch.no_grad():
        return model(tokens, positions, None)[..., : TINY.vocab_size]  # [b, s, vocab]


@pytest.mark.parametrize("rope_type", sorted(ROPE_CASES))
def test_logits_match_transformers_on_pose_positions(megatron_env, rope_type):
    scaling = ROPE_CASES[rope_type]
    hf = hf_llama(TINY, scaling)
    ours = pose_llama(TINY, scaling).eval()
    copy_hf_into_pose(hf, ours, TINY)

    tokens = torch.randint(0, TINY.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    positions = pose_positions(BATCH, SEQ, TARGET, seed=2)
    assert len({tuple(p.tolist()) for p in positions}) == BATCH  # every sample differs
    with torch.no_grad():
        # An explicit all-ones mask: without it transformers 5 reads each position jump as a new
        # packed sequence and blocks attention across it.
        expected = hf(tokens, position_ids=positions, attention_mask=torch.ones_like(tokens)).logits
    got = _logits(ours, tokens, positions)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

    # The positions must matter: contiguous ids give different logits after the chunk boundary.
    contiguous = torch.arange(SEQ).expand(BATCH, SEQ)
    assert not torch.allclose(_logits(ours, tokens, contiguous), got, atol=1e-3)


def test_shared_positions_use_one_rotary_row(megatron_env):
    """Identical positions across the micro-batch give [s, 1, 1, d] (TE's fused RoPE can take it)."""
    ours = pose_llama(TINY, ROPE_CASES["linear"])
    shared = pose_positions(1, SEQ, TARGET).expand(BATCH, SEQ)
    assert ours.pose_rotary(shared).shape == (SEQ, 1, 1, TINY.head_dim)
    assert ours.pose_rotary(pose_positions(BATCH, SEQ, TARGET)).shape == (SEQ, BATCH, 1, TINY.head_dim)


def test_attention_factor_is_folded_into_softmax_scale(megatron_env):
    scaling = ROPE_CASES["yarn"]
    ours = pose_llama(TINY, scaling)
    mscale = 0.1 * torch.log(torch.tensor(8.0)).item() + 1
    assert ours.config.softmax_scale == pytest.approx(mscale**2 / TINY.head_dim**0.5)


def test_loss_equals_stock_gptmodel_on_contiguous_positions(megatron_env):
    from megatron.core.models.gpt import GPTModel

    from pose_megatron.model import get_layer_spec
    from pose_megatron.rope import RopeScaling

    torch.manual_seed(0)
    ours = pose_llama(TINY, RopeScaling("default"))
    stock = GPTModel(
        ours.config, get_layer_spec(False), vocab_size=TINY.padded_vocab_size(),
        max_sequence_length=TINY.max_position_embeddings, position_embedding_type="rope",
        rotary_base=TINY.rotary_base, share_embeddings_and_output_weights=False,
    )
    stock.load_state_dict(ours.state_dict(), strict=False)
    tokens = torch.randint(0, TINY.vocab_size, (BATCH, SEQ + 1))
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    loss_ours = ours(inputs, positions, None, labels=labels)
    loss_stock = stock(inputs, positions, None, labels=labels)
    assert torch.equal(loss_ours, loss_stock)


def test_norm_head_normalises_output_rows(megatron_env):
    """Baichuan2's NormHead: logits = h @ normalize(W)^T, with W stored raw."""
    import dataclasses

    cfg = dataclasses.replace(TINY, norm_head=True)
    scaling = ROPE_CASES["default"]
    hf = hf_llama(cfg, scaling)
    ours = pose_llama(cfg, scaling).eval()
    copy_hf_into_pose(hf, ours, cfg)
    raw = ours.output_layer.weight.detach().clone()
    with torch.no_grad():
        hf.lm_head.weight.copy_(F.normalize(hf.lm_head.weight, dim=-1))
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    positions = torch.arange(16).expand(2, 16)
    expected = hf(tokens, position_ids=positions, attention_mask=torch.ones_like(tokens)).logits
    torch.testing.assert_close(_logits(ours, tokens, positions), expected.detach(), atol=1e-4, rtol=0)
    assert torch.equal(ours.output_layer.weight, raw)  # the stored weight stays raw
