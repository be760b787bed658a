"""config.json -> RopeScaling: the PoSE authors' released checkpoints, transformers 4.x / 5 spellings,
and our own exports (which must re-import as exactly what was exported).

The released PoSE models (LLaMA-7B, LLaMA2-7B, Baichuan2-7B at 16k / 96k / 128k) write
`max_position_embeddings` = the target length and `rope_scaling = {"type": t, "factor": s}` with t in
linear / vanilla_ntk (static NTK) / yarn (+ original_max_position_embeddings; the REVISED formula), and
LLaMA's vocabulary grown to 32001 by a pad token.
"""

import dataclasses
import json

import pytest
import torch

from pose_megatron.checkpoint.errors import ConversionError
from pose_megatron.checkpoint.families import FAMILIES
from pose_megatron.checkpoint.hf_arch import hf_config_for_export, model_info_from_hf_config
from pose_megatron.checkpoint.hf_import import convert_hf_to_megatron
from pose_megatron.checkpoint.hf_rope import POSE_CONFIG_KEY, rope_to_hf_parameters
from pose_megatron.checkpoint.megatron_io import load_model_weights
from pose_megatron.presets import MODEL_PRESETS
from pose_megatron.rope import RopeScaling, compute_inv_freq
from tiny_models import EXPORT_ROPE_CASES, ROPE_CASES, TINY, hf_llama, pose_llama, pose_positions

LLAMA_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
    "rms_norm_eps": 1e-6, "vocab_size": 32001, "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 32000, "hidden_act": "silu", "torch_dtype": "float16", "tie_word_embeddings": False,
}
BAICHUAN2_7B = {
    "architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "hidden_size": 4096,
    "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
    "rms_norm_eps": 1e-6, "vocab_size": 125696, "hidden_act": "silu", "tokenizer_class": "BaichuanTokenizer",
    "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                 "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
}
RELEASES = {  # name: (config, expected RopeScaling, L_c, L_t)
    "LLaMA-7B-PoSE-Linear-16k": ({**LLAMA_7B, "max_position_embeddings": 16384,
                                  "rope_scaling": {"type": "linear", "factor": 8.0}},
                                 RopeScaling("linear", 8.0), 2048, 16384),
    "LLaMA2-7B-PoSE-NTK-96k": ({**LLAMA_7B, "rms_norm_eps": 1e-5, "max_position_embeddings": 98304,
                                "rope_scaling": {"type": "vanilla_ntk", "factor": 24.0}},
                               RopeScaling("ntk", 24.0), 4096, 98304),
    "LLaMA-7B-PoSE-YaRN-128k": ({**LLAMA_7B, "max_position_embeddings": 131072,
                                 "rope_scaling": {"type": "yarn", "factor": 64.0,
                                                  "original_max_position_embeddings": 2048}},
                                RopeScaling("yarn-revised", 64.0, 2048), 2048, 131072),
    "Baichuan2-7B-PoSE-Linear-96k": ({**BAICHUAN2_7B, "max_position_embeddings": 98304,
                                      "rope_scaling": {"type": "linear", "factor": 24.0}},
                                     RopeScaling("linear", 24.0), 4096, 98304),
}


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_released_configs_map_to_our_rope_types(name):
    config, rope, window, target = RELEASES[name]
    info = model_info_from_hf_config(config)
    assert info.rope_scaling == rope
    assert info.model.max_position_embeddings == window and info.target_length == target
    assert info.model.rotary_base == 10000.0
    if name.startswith("Baichuan2"):
        assert info.family.name == "baichuan2" and info.model.norm_head
        assert dataclasses.replace(info.model, max_position_embeddings=4096) == MODEL_PRESETS["baichuan2-7b"]
    else:
        assert info.family.name == "llama" and info.model.vocab_size == 32001
        # The pad token makes the padding TP-dependent: 32128 at TP 1, 32256 at TP 2.
        assert (info.model.padded_vocab_size(1), info.model.padded_vocab_size(2)) == (32128, 32256)


def test_other_config_spellings():
    llama31 = {**LLAMA_7B, "vocab_size": 128256, "num_key_value_heads": 8, "max_position_embeddings": 131072,
               "rope_theta": 500000.0,  # transformers 4.x: rope_scaling with rope_type, top-level theta
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    info = model_info_from_hf_config(llama31)
    assert info.rope_scaling == RopeScaling("llama3", 8.0, 8192, low_freq_factor=1.0, high_freq_factor=4.0)
    assert info.model.rotary_base == 500000.0 and info.model.num_query_groups == 8
    assert (info.model.max_position_embeddings, info.target_length) == (8192, 131072)

    plain = model_info_from_hf_config({**LLAMA_7B, "max_position_embeddings": 4096, "rope_theta": 10000.0})
    assert plain.rope_scaling == RopeScaling() and plain.target_length is None

    yarn = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048, "rope_theta": 1e4}
    v5 = model_info_from_hf_config({**LLAMA_7B, "max_position_embeddings": 16384, "rope_parameters": yarn})
    assert v5.rope_scaling == RopeScaling("yarn", 8.0, 2048)  # an HF yarn config is HF's formula
    nous = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048, "finetuned": True}
    assert model_info_from_hf_config({**LLAMA_7B, "max_position_embeddings": 16384, "rope_scaling": nous}
                                     ).rope_scaling.rope_type == "yarn"
    release = RELEASES["LLaMA-7B-PoSE-YaRN-128k"][0]
    assert model_info_from_hf_config(release, legacy_yarn="standard").rope_scaling.rope_type == "yarn"


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("legacy", [True, False], ids=["type-yarn", "rope_type-yarn"])
def test_yarn_without_its_original_length_is_refused_naming_both_readings(key, legacy):
    yarn = {"type" if legacy else "rope_type": "yarn", "factor": 8.0}
    config = {**LLAMA_7B, "max_position_embeddings": 16384, key: yarn}
    with pytest.raises(ConversionError) as exc:
        model_info_from_hf_config(config)
    message = str(exc.value)
    assert "max_position_embeddings (16384)" in message  # stock transformers' reading
    assert "max_position_embeddings / factor (2048)" in message  # the PoSE convention
    assert 'Add "original_max_position_embeddings"' in message
    # With the key (inside rope_scaling or at the top level) it imports.
    assert model_info_from_hf_config({**config, "original_max_position_embeddings": 2048}
                                     ).rope_scaling.original_max_position_embeddings == 2048
    llama3 = {**LLAMA_7B, "max_position_embeddings": 131072, key: {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0}}
    with pytest.raises(ConversionError, match="llama3 config has no original_max_position_embeddings"):
        model_info_from_hf_config(llama3)


EXPORT_CASES = EXPORT_ROPE_CASES


@pytest.mark.parametrize("rope_type", sorted(EXPORT_CASES))
def test_exports_reimport_exactly(rope_type):
    """Our config.json re-imports as what was exported (serving-engine keys included: longrope's
    mscales, linear's legacy type, llama3's top-level original length); without our block, the stock
    fields alone give the same frequencies (ntk reads back as default RoPE with the NTK base)."""
    scaling = EXPORT_CASES[rope_type]
    exported = hf_config_for_export(TINY, scaling, FAMILIES["llama"], 512, torch.bfloat16, seq_length=64)
    info = model_info_from_hf_config(json.loads(json.dumps(exported)))
    assert info.rope_scaling == scaling and info.model == TINY and info.target_length == 512

    stock = {k: v for k, v in exported.items() if k != POSE_CONFIG_KEY}
    plain = model_info_from_hf_config(json.loads(json.dumps(stock)))
    expected = compute_inv_freq(scaling, TINY.head_dim, TINY.rotary_base)
    got = compute_inv_freq(plain.rope_scaling, TINY.head_dim, plain.model.rotary_base)
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]
    if rope_type != "ntk":
        assert plain.rope_scaling == scaling
    if rope_type == "yarn-revised":  # an export written before the vLLM keys re-imports as well
        older = json.loads(json.dumps(exported))
        for params in (older["rope_parameters"], older["rope_scaling"]):
            del params["short_mscale"], params["long_mscale"]
        assert model_info_from_hf_config(older).rope_scaling == scaling

    edited = json.loads(json.dumps(exported))
    edited["rope_theta"] = edited["rope_parameters"]["rope_theta"] = 12345.0
    with pytest.raises(ConversionError, match="disagrees"):
        model_info_from_hf_config(edited)


RELEASE_KINDS = {"linear": "linear", "vanilla_ntk": "ntk", "yarn": "yarn-revised"}


@pytest.mark.parametrize("kind", sorted(RELEASE_KINDS))
def test_release_checkpoint_computes_what_its_rope_means(megatron_env, tmp_path, kind):
    """A tiny checkpoint whose config.json is written the PoSE-release way imports to a PoseGPTModel
    with the logits of the stock model that computes the intended RoPE (revised YaRN for "yarn")."""
    factor = 8.0
    scaling = RopeScaling(RELEASE_KINDS[kind], factor,
                          TINY.max_position_embeddings if kind == "yarn" else None)
    hf = hf_llama(TINY, scaling)  # stock transformers with the equivalent rope_parameters
    hf.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_parameters"] == rope_to_hf_parameters(scaling, TINY.rotary_base, TINY.head_dim)
    del config["rope_parameters"]
    config["rope_scaling"] = {"type": kind, "factor": factor}
    if kind == "yarn":
        config["rope_scaling"]["original_max_position_embeddings"] = TINY.max_position_embeddings
    config.update(rope_theta=TINY.rotary_base,
                  max_position_embeddings=int(TINY.max_position_embeddings * factor))
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))

    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "megatron")
    model = pose_llama(TINY, scaling).eval()
    stored = load_model_weights(tmp_path / "megatron", model)
    assert stored.rope_scaling == scaling
    assert stored.model.max_position_embeddings == TINY.max_position_embeddings
    tokens = torch.randint(0, TINY.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    positions = pose_positions(2, 40, 8 * TINY.max_position_embeddings, seed=3)
    with torch.no_grad():
        got = model(tokens, positions, None)[..., : TINY.vocab_size]
        expected = hf(tokens, position_ids=positions, attention_mask=torch.ones_like(tokens)).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_engine_keys_that_contradict_the_rope_are_refused():
    """Keys only some readers use must agree with the rest, or engines would serve different models."""
    def exported(kind):
        return json.loads(json.dumps(hf_config_for_export(TINY, ROPE_CASES[kind], FAMILIES["llama"], 512,
                                                          torch.float32)))

    for with_block in (True, False):
        def edited(kind, edit):
            config = exported(kind)
            edit(config)
            return config if with_block else {k: v for k, v in config.items() if k != POSE_CONFIG_KEY}

        def mscale(config):
            config["rope_scaling"]["short_mscale"] = 1.0
        with pytest.raises(ConversionError, match=r"longrope short_mscale=1.0 differs from attention_factor"
                                                  if not with_block else "disagrees"):
            model_info_from_hf_config(edited("yarn-revised", mscale))

        def legacy_type(config):
            config["rope_scaling"]["type"] = "yarn"
        with pytest.raises(ConversionError, match="rope_type 'linear' but type 'yarn'"):
            model_info_from_hf_config(edited("linear", legacy_type))

        def top_level(config):
            config["original_max_position_embeddings"] = 128
        with pytest.raises(ConversionError, match="original_max_position_embeddings 128 at the top level but 64"):
            model_info_from_hf_config(edited("llama3", top_level))
