"""Baichuan-7B / Baichuan2-7B <-> Megatron on tiny random checkpoints in Baichuan's own layout.

transformers has no Baichuan model (Baichuan ships remote code), so the reference is a forward written
here from the architecture facts: LLaMA with `self_attn.W_pack.weight` = [Wq; Wk; Wv] (multi-head,
RoPE base 10000) and, for Baichuan2, a NormHead: logits use lm_head with each vocab row L2-normalised.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pose_megatron.checkpoint.errors import ConversionError
from pose_megatron.checkpoint.hf_export import convert_megatron_to_hf
from pose_megatron.checkpoint.hf_import import convert_hf_to_megatron
from pose_megatron.checkpoint.layout import load_run_config
from pose_megatron.checkpoint.megatron_io import load_model_weights
from tiny_models import pose_llama, pose_positions

HIDDEN, HEADS, FFN, LAYERS, VOCAB, MAX_POS = 64, 4, 96, 2, 250, 128
VERSIONS = {"baichuan-7b": "BaiChuanForCausalLM", "baichuan2-7b": "BaichuanForCausalLM"}
FAMILY_NAMES = {"baichuan-7b": "baichuan", "baichuan2-7b": "baichuan2"}  # RunConfig.family
# The remote-code classes of the published configs (Baichuan-7B spells its classes "BaiChuan").
PUBLISHED_AUTO_MAP = {
    "BaiChuanForCausalLM": {"AutoConfig": "configuration_baichuan.BaiChuanConfig",
                            "AutoModelForCausalLM": "modeling_baichuan.BaiChuanForCausalLM"},
    "BaichuanForCausalLM": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                            "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
}


def baichuan_config(arch: str) -> dict:
    """The shape of Baichuan's published config.json, at tiny sizes."""
    config = {
        "architectures": [arch], "auto_map": PUBLISHED_AUTO_MAP[arch],
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu",
        "hidden_size": HIDDEN, "initializer_range": 0.02, "intermediate_size": FFN,
        "max_position_embeddings": MAX_POS, "model_type": "baichuan", "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "torch_dtype": "float32", "transformers_version": "4.29.2", "use_cache": True, "vocab_size": VOCAB,
    }
    if arch == "BaichuanForCausalLM":
        config.update(tokenizer_class="BaichuanTokenizer", model_max_length=MAX_POS, z_loss_weight=0)
    return config


def random_baichuan_state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def matrix(rows, cols):
        return torch.randn(rows, cols, generator=g) * 0.1

    state = {"model.embed_tokens.weight": matrix(VOCAB, HIDDEN),
             "model.norm.weight": torch.rand(HIDDEN, generator=g) + 0.5}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        state.update({
            p + "input_layernorm.weight": torch.rand(HIDDEN, generator=g) + 0.5,
            p + "self_attn.W_pack.weight": matrix(3 * HIDDEN, HIDDEN),
            p + "self_attn.o_proj.weight": matrix(HIDDEN, HIDDEN),
            p + "post_attention_layernorm.weight": torch.rand(HIDDEN, generator=g) + 0.5,
            p + "mlp.gate_proj.weight": matrix(FFN, HIDDEN),
            p + "mlp.up_proj.weight": matrix(FFN, HIDDEN),
            p + "mlp.down_proj.weight": matrix(HIDDEN, FFN),
        })
    # Rows of very different norms, so that NormHead changes the logits a lot.
    state["lm_head.weight"] = matrix(VOCAB, HIDDEN) * (torch.rand(VOCAB, 1, generator=g) * 4 + 0.1)
    return state


def baichuan_reference_logits(state: dict, norm_head: bool, tokens, positions, eps=1e-6):
    """Baichuan-7B / Baichuan2-7B forward from the architecture facts (causal, RoPE on positions)."""
    b, s = tokens.shape
    d = HIDDEN // HEADS
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = positions[..., None].float() * inv_freq  # [b, s, d/2]
    emb = torch.cat([angles, angles], dim=-1)[:, None]  # [b, 1, s, d]
    cos, sin = emb.cos(), emb.sin()

    def rms_norm(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)

    causal = torch.ones(s, s, dtype=torch.bool).tril()
    h = state["model.embed_tokens.weight"][tokens]  # [b, s, H]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        x = rms_norm(h, state[p + "input_layernorm.weight"])
        q, k, v = (x @ state[p + "self_attn.W_pack.weight"].T).chunk(3, dim=-1)
        q, k, v = (t.view(b, s, HEADS, d).transpose(1, 2) for t in (q, k, v))  # [b, heads, s, d]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        h = h + (attn @ v).transpose(1, 2).reshape(b, s, HIDDEN) @ state[p + "self_attn.o_proj.weight"].T
        x = rms_norm(h, state[p + "post_attention_layernorm.weight"])
        mlp = F.silu(x @ state[p + "mlp.gate_proj.weight"].T) * (x @ state[p + "mlp.up_proj.weight"].T)
        h = h + mlp @ state[p + "mlp.down_proj.weight"].T
    h = rms_norm(h, state["model.norm.weight"])
    head = state["lm_head.weight"]
    if norm_head:
        head = F.normalize(head, dim=-1)
    return h @ head.T


def write_baichuan(path, version, state):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(baichuan_config(VERSIONS[version])))
    if version == "baichuan2-7b":  # as published: one pytorch_model.bin (both formats get tested)
        torch.save(state, path / "pytorch_model.bin")
    else:
        save_file(state, str(path / "model.safetensors"))
    for name in ("tokenizer.model", "tokenization_baichuan.py", "modeling_baichuan.py",
                 "configuration_baichuan.py", "generation_config.json"):
        (path / name).write_text(f"# {name}\n")
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": MAX_POS}))


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_baichuan_imports_computes_reference_and_exports_in_its_own_layout(megatron_env, tmp_path, version):
    norm_head = version == "baichuan2-7b"
    state = random_baichuan_state()
    write_baichuan(tmp_path / "hf", version, state)
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "megatron", tp=2)
    run = load_run_config(tmp_path / "megatron" / "release")
    assert run.family == FAMILY_NAMES[version] and run.model.norm_head is norm_head
    assert run.model.num_query_groups == HEADS and run.rope_scaling.rope_type == "default"

    model = pose_llama(run.model, run.rope_scaling).eval()
    load_model_weights(tmp_path / "megatron", model)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    positions = pose_positions(2, 24, 4 * MAX_POS, seed=2)
    with torch.no_grad():
        got = model(tokens, positions, None)[..., :VOCAB]
    expected = baichuan_reference_logits(state, norm_head, tokens, positions)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # NormHead is the model's: the raw head gives other logits.
    raw = baichuan_reference_logits(state, not norm_head, tokens, positions)
    assert not torch.allclose(got, raw, atol=1e-2)

    convert_megatron_to_hf(tmp_path / "megatron", tmp_path / "back", tokenizer_dir=tmp_path / "hf")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(back) == sorted(state)
    for name, tensor in state.items():  # W_pack fused back; lm_head raw (not normalised)
        assert torch.equal(back[name], tensor), name
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    published = baichuan_config(VERSIONS[version])
    for key in ("architectures", "auto_map", "model_type", "bos_token_id", "eos_token_id", "pad_token_id",
                "hidden_size", "num_attention_heads", "vocab_size", "rms_norm_eps"):
        assert config[key] == published[key], key
    if norm_head:
        assert config["tokenizer_class"] == "BaichuanTokenizer" and config["z_loss_weight"] == 0
    for name in ("modeling_baichuan.py", "configuration_baichuan.py", "tokenization_baichuan.py"):
        assert (tmp_path / "back" / name).exists(), name  # auto_map's remote code travels along


def test_baichuan2_13b_is_rejected_because_it_uses_alibi(tmp_path):
    """Baichuan2-13B's published config: 40 layers of 5120, no max_position_embeddings."""
    config = baichuan_config("BaichuanForCausalLM")
    del config["max_position_embeddings"]
    config.update(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                  intermediate_size=13696, vocab_size=125696, model_max_length=4096)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="ALiBi.*PoSE.*does not apply"):
        convert_hf_to_megatron(tmp_path / "hf", tmp_path / "megatron")
    assert not (tmp_path / "megatron").exists()


def test_pose_config_from_before_baichuan2_had_its_own_record_still_exports(tmp_path):
    """pose_config.json files once said family "baichuan" for both versions (model.norm_head told
    them apart): such a Baichuan2-7B checkpoint still exports as Baichuan2-7B."""
    state = random_baichuan_state(seed=3)
    write_baichuan(tmp_path / "hf", "baichuan2-7b", state)
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "megatron")
    config_path = tmp_path / "megatron" / "release" / "pose_config.json"
    stored = json.loads(config_path.read_text())
    assert stored["family"] == "baichuan2" and stored["model"]["norm_head"] is True
    config_path.write_text(json.dumps({**stored, "family": "baichuan"}))

    convert_megatron_to_hf(tmp_path / "megatron", tmp_path / "back")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == ["BaichuanForCausalLM"]
    assert config["auto_map"] == PUBLISHED_AUTO_MAP["BaichuanForCausalLM"]
    assert config["model_max_length"] == MAX_POS
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert all(torch.equal(back[name], tensor) for name, tensor in state.items())

    # A family that contradicts the model's head is refused, not exported in the wrong layout.
    config_path.write_text(json.dumps({**stored, "family": "llama"}))
    with pytest.raises(ConversionError, match="family 'llama' but model.norm_head=True"):
        convert_megatron_to_hf(tmp_path / "megatron", tmp_path / "wrong")
