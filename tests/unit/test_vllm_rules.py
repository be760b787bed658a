"""Every exported config.json gives vLLM 0.33.0 the trained RoPE, by vLLM's own rules.

vLLM cannot run on these machines; tests/vllm_rules.py encodes its source's rules (each citing the
vLLM file and function) and scripts/check_vllm_rules.py checks that encoding against vLLM's own
get_rope / ModelConfig (docs/vllm.md). Here: for each rope type pose_megatron exports, vLLM's effective
inv_freq and attention scale equal pose_megatron.rope.compute_inv_freq, its default max_model_len is
the one the docs declare, and every position up to it has a cos/sin cache row.
"""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from vllm_rules import VllmRefuses, served, vllm_rope

from pose_megatron.checkpoint.families import FAMILIES
from pose_megatron.checkpoint.hf_arch import hf_config_for_export
from pose_megatron.presets import MODEL_PRESETS
from pose_megatron.rope import RopeScaling, compute_inv_freq
from tiny_models import EXPORT_ROPE_CASES, TINY

CASES = {  # name: (model, RopeScaling, declared max_position_embeddings)
    **{kind: (TINY, scaling, 512) for kind, scaling in EXPORT_ROPE_CASES.items()},
    "llama-7b-linear-16k": (MODEL_PRESETS["llama-7b"], RopeScaling("linear", 8.0), 16384),
    "llama-7b-yarn-revised-128k": (MODEL_PRESETS["llama-7b"], RopeScaling("yarn-revised", 64.0, 2048), 131072),
    "llama3-8b-llama3-128k": (MODEL_PRESETS["llama3-8b"], RopeScaling("llama3", 8.0, 8192), 131072),
}


def export_config(model, scaling, max_positions):
    config = hf_config_for_export(model, scaling, FAMILIES["llama"], max_positions, torch.bfloat16,
                                  seq_length=model.max_position_embeddings)
    return json.loads(json.dumps(config))


def declared_default_max_model_len(config):
    """The default max_model_len the docs declare for vLLM: max_position_embeddings, except linear
    (vLLM multiplies by the factor; serve it with --max-model-len max_position_embeddings)."""
    params = config["rope_parameters"]
    factor = params["factor"] if params["rope_type"] == "linear" else 1
    return int(config["max_position_embeddings"] * factor)


@pytest.mark.parametrize("name", sorted(CASES))
def test_vllm_computes_the_trained_rope_of_every_export(name):
    model, scaling, max_positions = CASES[name]
    config = export_config(model, scaling, max_positions)
    assert served(config)
    trained, attention_factor = compute_inv_freq(scaling, model.head_dim, model.rotary_base)
    default = vllm_rope(config)
    # The user's flag for linear (docs/vllm.md), the declared context, and a short context.
    for user in (None, max_positions, scaling.original_max_position_embeddings or model.max_position_embeddings):
        got = vllm_rope(config, max_model_len=user)
        np.testing.assert_allclose(got.inv_freq, trained.double().numpy(), rtol=1e-6)
        assert got.attention_scale == pytest.approx(attention_factor, rel=1e-12)
        assert got.cache_rows >= got.max_model_len  # every position it serves has a cache row
    assert default.max_model_len == declared_default_max_model_len(config)
    assert config["max_position_embeddings"] == max_positions


def _without_mscales(config):
    for params in (config["rope_parameters"], config["rope_scaling"]):
        del params["short_mscale"], params["long_mscale"]


def _attn_factor_key(config):
    for params in (config["rope_parameters"], config["rope_scaling"]):
        params["attn_factor"] = params.pop("attention_factor")


# Configs that differ from the exports in one key vLLM reads, and what vLLM then does: why the export
# writes what it writes. name: (CASES entry, edit of its config.json, --max-model-len, expectation).
PROBES = {
    # vLLM ignores attention_factor: sqrt(1 + ln(max_pos / L_o) / ln L_o) = 1.2432, not 1.4159
    "longrope without short/long_mscale, LLaMA-7B 2k -> 128k": (
        "llama-7b-yarn-revised-128k", _without_mscales, None,
        {"attention_scale": math.sqrt(1 + math.log(64) / math.log(2048))}),
    "yarn with attn_factor 1.5 instead of attention_factor": (
        "yarn-attention-factor", _attn_factor_key, None, {"attention_scale": 0.1 * math.log(8) + 1}),
    "longrope with a top-level original_max_position_embeddings": (
        "yarn-revised", lambda c: c.update(original_max_position_embeddings=64), None, {"max_model_len": 64}),
    "linear, no --max-model-len": ("linear", None, None, {"max_model_len": 4096}),
    "linear, --max-model-len = max_position_embeddings": ("linear", None, 512, {"max_model_len": 512}),
    "yarn, --max-model-len above max_position_embeddings": (
        "yarn", None, 1024, {"refused": "greater than the derived max_model_len"}),
    "linear whose legacy type says yarn": (
        "linear", lambda c: c["rope_scaling"].update(type="yarn"), None, {"refused": "conflicts with legacy type"}),
}


def probe_config(name):
    case, edit, user, expected = PROBES[name]
    config = export_config(*CASES[case])
    if edit is not None:
        edit(config)
    return config, user, expected


@pytest.mark.parametrize("name", sorted(PROBES))
def test_keys_vllm_reads_elsewhere_would_change_what_it_serves(name):
    config, user, expected = probe_config(name)
    if "refused" in expected:
        with pytest.raises(VllmRefuses, match=expected["refused"]):
            vllm_rope(config, max_model_len=user)
        return
    got = vllm_rope(config, max_model_len=user)
    if "attention_scale" in expected:
        assert got.attention_scale == pytest.approx(expected["attention_scale"], rel=1e-12)
    if "max_model_len" in expected:
        assert got.max_model_len == expected["max_model_len"]


def test_the_issues_numbers():
    """LLaMA-7B 2k -> 128k revised YaRN: vLLM's own longrope scale 1.2432, the trained 1.4159."""
    config, user, _ = probe_config("longrope without short/long_mscale, LLaMA-7B 2k -> 128k")
    assert round(vllm_rope(config, max_model_len=user).attention_scale, 4) == 1.2432
    model, scaling, _ = CASES["llama-7b-yarn-revised-128k"]
    assert round(compute_inv_freq(scaling, model.head_dim, model.rotary_base)[1], 4) == 1.4159


def test_linear_export_writes_the_legacy_type_key_only_beside_rope_type():
    """The legacy `type` is only in rope_scaling, only for linear, and never `yarn` (PoSE's releases
    mean revised YaRN by it); vLLM accepts it because it agrees with rope_type."""
    for name, (model, scaling, max_positions) in CASES.items():
        config = export_config(model, scaling, max_positions)
        assert "type" not in config["rope_parameters"], name
        legacy = (config["rope_scaling"] or {}).get("type")
        assert legacy == ("linear" if scaling.rope_type == "linear" else None), name
        top_level = config.get("original_max_position_embeddings")
        assert top_level == (scaling.original_max_position_embeddings if scaling.rope_type == "llama3" else None)


def test_baichuan_exports_are_not_served_by_vllm_033():
    """registry.py lists both Baichuan architectures as supported only until v0.23.0."""
    for family in ("baichuan", "baichuan2"):
        model = dataclasses.replace(TINY, num_query_groups=TINY.num_attention_heads,
                                    norm_head=FAMILIES[family].norm_head)
        config = hf_config_for_export(model, RopeScaling(), FAMILIES[family], 64, torch.float32)
        assert not served(config)
        with pytest.raises(VllmRefuses, match="has no model for"):
            vllm_rope(config)
