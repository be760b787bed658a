"""HF -> Megatron at --tp 2 --pp 2 loads at every TP x PP in {1,2}^2 with HF's logits; a checkpoint
saved sharded at TP=2 x PP=2 exports back to a Hugging Face model with the same logits."""

import dataclasses
import json

import torch
from launch import torchrun

from pose_megatron.checkpoint.hf_export import convert_megatron_to_hf
from pose_megatron.checkpoint.hf_import import convert_hf_to_megatron
from tiny_models import ROPE_CASES, TINY, hf_llama, pose_positions

# vocab 500 pads to 512 at TP 1 and 2 (so one import serves both); GQA with 2 query groups.
CFG = dataclasses.replace(TINY, vocab_size=500)
SEQ, BATCH, TARGET = 40, 2, 8 * TINY.max_position_embeddings


def test_import_loads_at_every_layout_and_sharded_save_exports(tmp_path):
    from transformers import AutoModelForCausalLM

    scaling = ROPE_CASES["yarn"]
    hf = hf_llama(CFG, scaling)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "megatron", tp=2, pp=2)

    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, CFG.vocab_size, (BATCH, SEQ), generator=g)
    positions = pose_positions(BATCH, SEQ, TARGET, seed=4)  # up to 8x the original window
    with torch.no_grad():
        logits = hf(tokens, position_ids=positions, attention_mask=torch.ones_like(tokens)).logits
    torch.save({"tokens": tokens, "positions": positions, "logits": logits, "target": TARGET},
               tmp_path / "case.pt")
    out = tmp_path / "out"
    out.mkdir()
    torchrun("convert_tp_pp_worker.py", 4, str(tmp_path / "megatron"), str(tmp_path / "case.pt"), str(out))

    report = json.loads((out / "report.json").read_text())
    for layout in ("1,1", "2,1", "1,2", "2,2"):
        assert report[layout] < 1e-4, (layout, report)
        assert report[f"{layout} padding"] == 0.0, (layout, report)

    # The TP=2 x PP=2 save (changed weights) -> HF -> stock transformers: the same logits.
    convert_megatron_to_hf(out / "trained", tmp_path / "exported")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", attn_implementation="eager")
    assert exported.config.max_position_embeddings == TARGET
    with torch.no_grad():
        got = exported.eval()(tokens, position_ids=positions, attention_mask=torch.ones_like(tokens)).logits
    (trained_logits,) = [torch.load(p) for p in out.glob("trained_logits_rank*.pt")]
    torch.testing.assert_close(got, trained_logits, atol=1e-4, rtol=0)
    assert not torch.allclose(got, logits, atol=1e-2)  # the change is visible: not the import again
