"""A family that differs from LLaMA only in tensor names, QKV layout and config keys is one record.

Each record here exists only inside its test: it is registered in FAMILIES, a tiny random checkpoint
is written in its layout (a stock transformers LLaMA with every tensor renamed, q/k/v fused where the
record says so, config.json keys respelled), and the converters -- unchanged -- take it HF ->
Megatron -> HF bit-exactly, with the stock LLaMA's logits in between.
"""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pose_megatron.checkpoint.errors import ConversionError
from pose_megatron.checkpoint.families import FAMILIES, QKV_FUSED, Family
from pose_megatron.checkpoint.hf_arch import model_info_from_hf_config
from pose_megatron.checkpoint.hf_export import convert_megatron_to_hf
from pose_megatron.checkpoint.hf_import import convert_hf_to_megatron
from pose_megatron.checkpoint.layout import load_run_config
from pose_megatron.checkpoint.megatron_io import load_model_weights
from pose_megatron.checkpoint.megatron_keys import (
    EMBEDDING,
    FC1,
    FC2,
    FINAL_NORM,
    INPUT_NORM,
    MLP_NORM,
    OUTPUT,
    PROJ,
    QKV,
    file_order,
)
from tiny_models import ROPE_CASES, TINY, hf_llama, pose_llama, pose_positions

RENAMED = Family(
    name="test-renamed-llama", title="LLaMA under other names",
    weights={
        EMBEDDING: ("transformer.wte.weight",),
        INPUT_NORM: ("transformer.h.{}.ln_attn.weight",),
        QKV: ("transformer.h.{}.attn.wq.weight", "transformer.h.{}.attn.wk.weight",
              "transformer.h.{}.attn.wv.weight"),
        PROJ: ("transformer.h.{}.attn.wo.weight",),
        MLP_NORM: ("transformer.h.{}.ln_mlp.weight",),
        FC1: ("transformer.h.{}.ffn.w1.weight", "transformer.h.{}.ffn.w3.weight"),
        FC2: ("transformer.h.{}.ffn.w2.weight",),
        FINAL_NORM: ("transformer.ln_f.weight",),
        OUTPUT: ("transformer.head.weight",),
    },
    architectures=("RenamedLlamaForCausalLM",), model_type="renamed_llama",
    auto_map={"AutoModelForCausalLM": "modeling_renamed.RenamedLlamaForCausalLM"},
    config_keys={"num_hidden_layers": "n_layer", "hidden_size": "n_embd", "num_attention_heads": "n_head",
                 "num_key_value_heads": "n_kv_head", "intermediate_size": "ffn_dim",
                 "rms_norm_eps": "norm_eps"},
    export_defaults={"use_cache": True},
)
# The same with one fused [Wq; Wk; Wv] per layer, and grouped-query attention (TINY has 2 groups).
FUSED = dataclasses.replace(
    RENAMED, name="test-fused-qkv-llama", qkv_layout=QKV_FUSED,
    weights={**RENAMED.weights, QKV: ("transformer.h.{}.attn.wqkv.weight",)},
    architectures=("FusedQkvLlamaForCausalLM",), model_type="fused_qkv_llama",
)


def write_in_family_layout(hf, family: Family, path) -> dict:
    """The stock LLaMA `hf` as a checkpoint of `family`: renamed (and fused) tensors, respelled keys."""
    llama, state = FAMILIES["llama"], hf.state_dict()
    tensors = {}
    for key, layer in file_order(TINY.num_layers):
        ours = [state[n] for n in llama.hf_names(key, layer)]
        if key == QKV and family.qkv_layout == QKV_FUSED:
            ours = [torch.cat(ours)]
        tensors.update(zip(family.hf_names(key, layer), ours, strict=True))
    config = {family.config_keys.get(k, k): v for k, v in json.loads(hf.config.to_json_string()).items()}
    config.update(architectures=list(family.architectures), model_type=family.model_type)
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path / "model.safetensors"))
    return tensors


@pytest.mark.parametrize("family", [RENAMED, FUSED], ids=lambda f: f.name)
def test_a_test_only_record_round_trips_and_computes_llama_logits(megatron_env, tmp_path, monkeypatch,
                                                                   family):
    monkeypatch.setitem(FAMILIES, family.name, family)
    scaling = ROPE_CASES["yarn-revised"]
    hf = hf_llama(TINY, scaling)
    tensors = write_in_family_layout(hf, family, tmp_path / "hf")

    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "megatron", tp=2)
    run = load_run_config(tmp_path / "megatron" / "release")
    assert run.family == family.name and run.model == TINY and run.rope_scaling == scaling

    model = pose_llama(TINY, scaling).eval()
    load_model_weights(tmp_path / "megatron", model)
    tokens = torch.randint(0, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    positions = pose_positions(2, 24, 8 * TINY.max_position_embeddings, seed=5)
    with torch.no_grad():
        got = model(tokens, positions, None)[..., : TINY.vocab_size]
        expected = hf(tokens, position_ids=positions, attention_mask=torch.ones_like(tokens)).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

    convert_megatron_to_hf(tmp_path / "megatron", tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(back) == sorted(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(back[name], tensor), name
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == [family.architectures[0]] and config["model_type"] == family.model_type
    assert config["auto_map"] == dict(family.auto_map) and config["use_cache"] is True
    assert {"n_layer", "n_embd", "n_head", "n_kv_head", "ffn_dim", "norm_eps"} <= set(config)
    assert not {"num_hidden_layers", "hidden_size", "intermediate_size", "rms_norm_eps"} & set(config)
    again = model_info_from_hf_config(config)
    assert again.family == family and again.model == TINY and again.rope_scaling == scaling


def test_an_unregistered_record_is_unknown(tmp_path):
    write_in_family_layout(hf_llama(TINY, ROPE_CASES["default"]), RENAMED, tmp_path / "hf")
    with pytest.raises(ConversionError, match="unsupported model: model_type 'renamed_llama'"):
        convert_hf_to_megatron(tmp_path / "hf", tmp_path / "megatron")
