"""On a GPU with Transformer Engine: the TE layer spec computes what the local spec computes.

CPU coverage of the same logic: tests/parity/test_model_hf.py (local spec vs transformers) and
tests/unit/test_attention.py (SDPA vs megatron's local attention).
"""

import pytest
import torch

from tiny_models import ROPE_CASES, TINY, pose_positions

from pose_megatron.runtime import transformer_engine_usable

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not transformer_engine_usable(), reason="needs Transformer Engine on a GPU"),
]


@pytest.mark.parametrize("micro_batch, fused", [(1, True), (3, False)])
def test_te_spec_matches_local_spec(megatron_env, tmp_path, micro_batch, fused):
    from megatron.core import dist_checkpointing

    from pose_megatron.model import build_transformer_config
    from pose_megatron.model import build_model

    scaling = ROPE_CASES["yarn-revised"]
    local = build_model(TINY, build_transformer_config(TINY), scaling, use_transformer_engine=False)
    dist_checkpointing.save(local.sharded_state_dict(), str(tmp_path))
    te_config = build_transformer_config(TINY, apply_rope_fusion=fused)
    te = build_model(TINY, te_config, scaling, use_transformer_engine=True)
    te.load_state_dict(dist_checkpointing.load(te.sharded_state_dict(), str(tmp_path)))
    tokens = torch.randint(0, TINY.vocab_size, (micro_batch, 48), device="cuda")
    positions = pose_positions(micro_batch, 48, 8 * TINY.max_position_embeddings).cuda()
    with torch.no_grad():
        expected = local.eval()(tokens, positions, None)
        got = te.eval()(tokens, positions, None)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)
