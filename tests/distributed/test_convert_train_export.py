"""The user's path end to end: HF LLaMA -> importer -> PoSE training (the trainer CLI) -> exporter ->
stock transformers, whose logits equal the trained PoseGPTModel's at positions beyond the window."""

import dataclasses

import torch
from launch import train

from pose_megatron.checkpoint.hf_export import convert_megatron_to_hf
from pose_megatron.checkpoint.hf_import import convert_hf_to_megatron
from pose_megatron.checkpoint.layout import load_run_config, resolve_checkpoint_dir
from pose_megatron.checkpoint.megatron_io import load_model_weights
from pose_megatron.corpus import ensure_sample_corpus
from pose_megatron.rope import RopeScaling
from tiny_models import TINY, hf_llama, pose_llama, pose_positions


def test_import_train_export_reproduces_logits(megatron_env, tmp_path):
    from transformers import AutoModelForCausalLM

    corpus = ensure_sample_corpus()
    base_cfg = dataclasses.replace(TINY, vocab_size=8192)  # the sample corpus tokenizer's vocabulary
    hf_dir = tmp_path / "hf"
    hf_llama(base_cfg, RopeScaling("default")).save_pretrained(hf_dir)
    convert_hf_to_megatron(hf_dir, tmp_path / "base", tp=1, pp=1)

    train(["--seq-length", "32", "--pose-target-length", "256", "--rope-type", "yarn-revised",
           "--rope-original-max-position-embeddings", "32", "--load", tmp_path / "base",
           "--save", tmp_path / "pose", "--train-iters", "3", "--lr-warmup-iters", "1",
           "--lr", "1e-3", "--global-batch-size", "2", "--eval-iters", "0",
           "--data-path", corpus.train_prefix, "--tokenizer-model", corpus.tokenizer_model])
    stored = load_run_config(resolve_checkpoint_dir(tmp_path / "pose"))
    assert stored.rope_scaling.rope_type == "yarn-revised" and stored.target_length == 256
    assert "hf_config" in stored.extra  # the importer's provenance survived training

    convert_megatron_to_hf(tmp_path / "pose", tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert exported.config.max_position_embeddings == 256
    ours = pose_llama(stored.model, stored.rope_scaling).eval()
    load_model_weights(tmp_path / "pose", ours)

    tokens = torch.randint(0, 8192, (2, 24))
    positions = pose_positions(2, 24, 256, seed=3)  # beyond the 32-token training window
    with torch.no_grad():
        expected = ours(tokens, positions, None)[..., :8192]
        got = exported(tokens, position_ids=positions, attention_mask=torch.ones_like(tokens)).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
