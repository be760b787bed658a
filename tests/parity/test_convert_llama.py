"""Hugging Face LLaMA <-> Megatron conversion on tiny random models.

- HF -> Megatron -> HF is bit-exact for every tensor (safetensors and sharded .bin, fp32 and bf16).
- The importer writes what megatron-core itself writes for the same model (keys, global shapes,
  dtypes, `_extra_state` objects) and PoseGPTModel then computes HF's logits.
- After a few PoSE training steps with each RoPE type, Megatron -> HF -> stock
  `AutoModelForCausalLM` reproduces PoseGPTModel's logits at positions far beyond the training length.
"""

import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pose_megatron.checkpoint.families import FAMILIES
from pose_megatron.checkpoint.hf_export import convert_megatron_to_hf
from pose_megatron.checkpoint.hf_import import convert_hf_to_megatron
from pose_megatron.checkpoint.layout import RunConfig, load_run_config
from pose_megatron.checkpoint.megatron_io import load_model_weights, save_model_weights
from pose_megatron.checkpoint.saved_state import read_common_state
from pose_megatron.checkpoint.weights import hf_to_megatron_state_dict
from tiny_models import ROPE_CASES, TINY, hf_llama, pose_llama, pose_positions

SEQ, BATCH = 32, 2
TARGET = 8 * TINY.max_position_embeddings  # every ROPE_CASES factor is 8


def save_bin_shards(model, path: Path, parts: int = 3) -> None:
    """A HF directory with pytorch_model-*.bin shards and their index (as older checkpoints ship)."""
    path.mkdir(parents=True)
    model.config.save_pretrained(path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old LLaMA saves had it
    names = list(state)
    weight_map = {}
    for i in range(parts):
        fname = f"pytorch_model-{i + 1:05d}-of-{parts:05d}.bin"
        chunk = names[i * len(names) // parts:(i + 1) * len(names) // parts]
        torch.save({n: state[n] for n in chunk}, path / fname)
        weight_map.update(dict.fromkeys(chunk, fname))
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


def read_safetensors_dir(path: Path) -> dict:
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            tensors.update({name: st.get_tensor(name) for name in st.keys()})  # noqa: SIM118
    return tensors


def hf_logits(model, tokens, positions):
    with torch.no_grad():  # all-ones mask: PoSE position jumps are not packed-sequence boundaries
        return model(tokens, position_ids=positions, attention_mask=torch.ones_like(tokens)).logits


@pytest.mark.parametrize("fmt,dtype", [("safetensors", torch.float32), ("bin", torch.bfloat16)])
def test_round_trip_is_bit_exact(tmp_path, fmt, dtype):
    cfg = dataclasses.replace(TINY, vocab_size=500)  # padded to 512 in between
    scaling = ROPE_CASES["llama3"]
    hf = hf_llama(cfg, scaling).to(dtype)
    if fmt == "safetensors":
        hf.save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    else:
        save_bin_shards(hf, tmp_path / "hf")
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "megatron", tp=2, pp=2)
    convert_megatron_to_hf(tmp_path / "megatron", tmp_path / "back", max_shard_bytes=60_000)

    original = {k: v for k, v in hf.state_dict().items()}
    back = read_safetensors_dir(tmp_path / "back")
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert back[name].dtype == dtype and torch.equal(back[name], tensor), name
    assert (tmp_path / "back" / "model.safetensors.index.json").exists()

    config = json.loads((tmp_path / "back" / "config.json").read_text())
    source = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_parameters"] == source["rope_parameters"]
    assert config["max_position_embeddings"] == TARGET
    for key in ("vocab_size", "hidden_size", "num_key_value_heads", "rms_norm_eps", "bos_token_id"):
        assert config[key] == source[key], key
    stored = load_run_config(tmp_path / "megatron" / "release")
    assert stored.extra["padded_vocab_size"] == 512 and stored.extra["source_format"] == fmt


def test_import_is_what_megatron_writes_and_computes_hf_logits(megatron_env, tmp_path):
    """Same tensors, shapes, dtypes and objects as megatron-core's own save of the loaded model."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    cfg = dataclasses.replace(TINY, vocab_size=500)
    scaling = ROPE_CASES["yarn-revised"]
    hf = hf_llama(cfg, scaling)
    hf.save_pretrained(tmp_path / "hf")
    ckpt = convert_hf_to_megatron(tmp_path / "hf", tmp_path / "megatron")
    model = pose_llama(cfg, scaling).eval()
    stored = load_model_weights(tmp_path / "megatron", model)
    assert stored.rope_scaling == scaling and stored.model == cfg and stored.target_length == TARGET

    expected = hf_to_megatron_state_dict(FAMILIES["llama"], cfg, hf.state_dict(), 512)
    for name, tensor in model.state_dict().items():
        if not name.endswith("_extra_state"):
            assert torch.equal(tensor, expected[name]), name
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    positions = pose_positions(BATCH, SEQ, TARGET, seed=1)
    with torch.no_grad():
        got = model(tokens, positions, None)[..., : cfg.vocab_size]
    torch.testing.assert_close(got, hf_logits(hf, tokens, positions), atol=1e-4, rtol=0)

    own = save_model_weights(tmp_path / "own", "release", model, stored)  # a release, as imported
    ours_md = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    own_md = FileSystemReader(str(own)).read_metadata().state_dict_metadata
    tensors = {k for k, v in own_md.items() if not isinstance(v, BytesStorageMetadata)}
    assert tensors == {k for k, v in ours_md.items() if not isinstance(v, BytesStorageMetadata)}
    for key in tensors:
        assert ours_md[key].size == own_md[key].size and ours_md[key].properties == own_md[key].properties
    objects = {k for k in own_md if k not in tensors and k.split("/")[0] != "common_state"}
    assert objects <= set(ours_md)  # every _extra_state object
    assert (ckpt / "metadata.json").read_bytes() == (own / "metadata.json").read_bytes()
    # megatron-core 0.19 keeps the common state inside the DCP checkpoint, older releases in common.pt;
    # the converter writes common.pt, which every supported release reads (docs/reference.md,
    # "megatron-core"). The contents are the same either way.
    assert _pickled(read_common_state(ckpt)) == _pickled(read_common_state(own))


def _pickled(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_tied_embeddings_are_untied(megatron_env, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=TINY.vocab_size, hidden_size=TINY.hidden_size, intermediate_size=TINY.ffn_hidden_size,
        num_hidden_layers=TINY.num_layers, num_attention_heads=TINY.num_attention_heads,
        num_key_value_heads=TINY.num_query_groups, max_position_embeddings=TINY.max_position_embeddings,
        tie_word_embeddings=True, attn_implementation="eager")).eval()
    hf.save_pretrained(tmp_path / "hf")
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "megatron")
    convert_megatron_to_hf(tmp_path / "megatron", tmp_path / "back")
    back = read_safetensors_dir(tmp_path / "back")
    assert torch.equal(back["lm_head.weight"], hf.model.embed_tokens.weight)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    assert exported.config.tie_word_embeddings is False
    tokens = torch.randint(0, TINY.vocab_size, (1, SEQ))
    positions = torch.arange(SEQ)[None]
    torch.testing.assert_close(hf_logits(exported, tokens, positions), hf_logits(hf, tokens, positions))


def _train_a_few_pose_steps(model, steps=3):
    """torch AdamW on PoseGPTModel with PoSE positions reaching 8x the original window."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(5)
    model.train()
    for step in range(steps):
        tokens = torch.randint(0, TINY.vocab_size, (BATCH, SEQ + 1), generator=g)
        positions = pose_positions(BATCH, SEQ, TARGET, seed=10 + step)
        loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("rope_type", sorted(ROPE_CASES))
def test_trained_checkpoint_exports_to_stock_transformers(megatron_env, tmp_path, rope_type):
    from transformers import AutoModelForCausalLM

    scaling = ROPE_CASES[rope_type]
    model = _train_a_few_pose_steps(pose_llama(TINY, scaling))
    run = RunConfig(model=TINY, rope_scaling=scaling, seq_length=SEQ, target_length=TARGET)
    save_model_weights(tmp_path / "run", 3, model, run)
    convert_megatron_to_hf(tmp_path / "run", tmp_path / "hf")

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert exported.config.max_position_embeddings == TARGET
    # Positions far beyond the training length SEQ (and the original window): skips up to TARGET.
    positions = torch.cat([pose_positions(1, SEQ, TARGET, seed=99), torch.arange(TARGET - SEQ, TARGET)[None]])
    tokens = torch.randint(0, TINY.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(7))
    assert positions.max() >= TARGET - 1
    with torch.no_grad():
        ours = model(tokens, positions, None)[..., : TINY.vocab_size]
    torch.testing.assert_close(hf_logits(exported, tokens, positions), ours, atol=1e-4, rtol=0)


def test_export_copies_tokenizer_with_new_max_length(tmp_path):
    hf_llama(TINY, ROPE_CASES["linear"]).save_pretrained(tmp_path / "hf")
    tok = tmp_path / "hf"
    (tok / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "add_bos_token": True}))
    (tok / "tokenizer.model").write_bytes(b"\x00sentencepiece")
    (tok / "special_tokens_map.json").write_text("{}")
    convert_hf_to_megatron(tok, tmp_path / "megatron")
    convert_megatron_to_hf(tmp_path / "megatron", tmp_path / "out", tokenizer_dir=tok)
    out = tmp_path / "out"
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"model_max_length": TARGET,
                                                                       "add_bos_token": True}
    assert (out / "tokenizer.model").read_bytes() == b"\x00sentencepiece"
    assert (out / "special_tokens_map.json").exists()
    # Weights come from the conversion, never copied from the tokenizer directory.
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == TARGET
