"""Family records: their validation, detection of a config.json, the lookups the trainer and the
exporter use, and the checkpoint package's import graph."""

import ast
import dataclasses
from pathlib import Path

import pytest

from pose_megatron.checkpoint.errors import ConversionError
from pose_megatron.checkpoint.families import (
    FAMILIES,
    QKV_FUSED,
    detect_family,
    family_for_model,
    family_named,
)
from pose_megatron.checkpoint.megatron_keys import FC1, QKV
from pose_megatron.presets import MODEL_PRESETS

LLAMA = FAMILIES["llama"]


@pytest.mark.parametrize("changes,message", [
    ({"weights": {k: v for k, v in LLAMA.weights.items() if k != FC1}}, "missing.*linear_fc1.weight"),
    ({"qkv_layout": QKV_FUSED}, r"linear_qkv.weight needs 1 HF name\(s\)"),
    ({"qkv_layout": "interleaved"}, "qkv_layout must be 'separate' or 'fused'"),
    ({"weights": {**LLAMA.weights, QKV: ("q", "k", "v")}}, r"per-layer names need one '\{\}'"),
    ({"architectures": ()}, "architectures must name at least one"),
    ({"config_keys": {"hidden_size": "d", "intermediate_size": "d"}}, "config_keys must map to distinct"),
])
def test_a_malformed_record_is_refused_when_built(changes, message):
    with pytest.raises(ValueError, match=f"family record 'llama': .*{message}"):
        dataclasses.replace(LLAMA, **changes)


@pytest.mark.parametrize("config,name", [
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "llama"),
    ({"model_type": "llama"}, "llama"),
    ({"architectures": ["BaiChuanForCausalLM"], "model_type": "baichuan"}, "baichuan"),
    ({"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan"}, "baichuan2"),
    ({"architectures": ["BaichuanForCausalLM"], "model_type": "llama"}, "baichuan2"),  # architecture wins
])
def test_detection_by_architecture_then_model_type(config, name):
    assert detect_family(config) is FAMILIES[name]


@pytest.mark.parametrize("config,message", [
    ({"model_type": "baichuan", "architectures": ["BaichuanModel"]},
     r"cannot tell Baichuan-7B from Baichuan2-7B.*Baichuan-7B: BaiChuanForCausalLM; Baichuan2-7B: "
     "BaichuanForCausalLM"),
    ({"model_type": "baichuan", "architectures": ["BaichuanForCausalLM"], "hidden_size": 5120,
      "num_hidden_layers": 40}, "Baichuan 13B-style model.*ALiBi"),
    ({"model_type": "baichuan", "alibi": True}, "its config mentions ALiBi"),
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
     r"unsupported model: model_type 'gpt2'.*supported are LLaMA-1/2/3 \(LlamaForCausalLM"),
])
def test_detection_refusals(config, message):
    with pytest.raises(ConversionError, match=message):
        detect_family(config)


def test_family_for_model_and_stored_names():
    assert family_for_model(MODEL_PRESETS["llama2-7b"]) is LLAMA
    assert family_for_model(MODEL_PRESETS["baichuan2-7b"]) is FAMILIES["baichuan2"]
    # pose_config.json files written before Baichuan2 had its own record
    assert family_named("baichuan", norm_head=True) is FAMILIES["baichuan2"]
    assert family_named("baichuan", norm_head=False) is FAMILIES["baichuan"]
    with pytest.raises(ConversionError, match="unknown model family 'gpt2'.*known: "):
        family_named("gpt2")
    with pytest.raises(ConversionError, match="family 'baichuan2' but model.norm_head=False"):
        family_named("baichuan2", norm_head=False)


def test_the_checkpoint_package_has_no_import_cycle():
    package = Path(__file__).resolve().parents[2] / "pose_megatron" / "checkpoint"
    prefix = "pose_megatron.checkpoint."
    graph = {}
    for path in package.glob("*.py"):
        imports = {node.module[len(prefix):].split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(prefix)}
        graph[path.stem] = imports
    assert {"families", "weights", "hf_import", "hf_export"} <= set(graph)

    def cycle_from(module, path):
        if module in path:
            return path[path.index(module):] + [module]
        for imported in graph.get(module, ()):
            found = cycle_from(imported, path + [module])
            if found:
                return found
        return None

    for module in graph:
        assert cycle_from(module, []) is None, " -> ".join(cycle_from(module, []))
