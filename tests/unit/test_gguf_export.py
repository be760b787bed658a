"""The GGUF step of the llama.cpp export, on small GGUFs written here with gguf.GGUFWriter.

The rewrite must leave every key and tensor of the converter's GGUF as it was (quantised bytes too)
except the RoPE, which becomes exactly what llama.cpp's runtime needs for the trained frequencies
(docs/reference.md, "Serving engines"): factor tensors and attention factor for revised or
non-default YaRN, none of the converter's leftovers, and NormHead rows normalised for Baichuan2.
What llama.cpp cannot run is refused before any work. The end-to-end check against a real llama.cpp
build is scripts/verify_llamacpp.py (docs/llamacpp.md).
"""

import dataclasses
import json
import math
import os

import gguf
import numpy as np
import pytest
import torch

from pose_megatron.checkpoint.errors import ConversionError
from pose_megatron.checkpoint.families import FAMILIES
from pose_megatron.checkpoint.gguf_export import export_gguf, plan_gguf_export, rewrite_gguf
from pose_megatron.checkpoint.gguf_rope import gguf_rope_for, plan_gguf_rope
from pose_megatron.checkpoint.hf_arch import hf_config_for_export, model_info_from_hf_config
from pose_megatron.rope import RopeScaling, compute_inv_freq, yarn_revised_ext_factors
from tiny_models import EXPORT_ROPE_CASES, TINY

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
HEAD = TINY.head_dim
ROPE = gguf.Keys.Rope
CASES = EXPORT_ROPE_CASES


def key(name, arch=ARCH):
    return name.format(arch=arch)


def tensor_name(kind):
    return gguf.TENSOR_NAMES[kind] + ".weight"


def write_converted_gguf(path, arch=ARCH, rope_keys=(), extra_tensors=None, output_type="f32"):
    """A GGUF shaped like llama.cpp converter output: header keys, a tokenizer, F32 / F16 / Q8_0 tensors."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_context_length(512)
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_rope_dimension_count(HEAD)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"t{i}" for i in range(32)])
    writer.add_token_scores([float(-i) for i in range(32)])
    for name, value, kind in rope_keys:
        writer.add_key_value(key(name, arch), value, kind)
    output = (rng.normal(size=(32, 64)) * rng.uniform(0.1, 4, size=(32, 1))).astype(np.float32)
    if output_type == "q8_0":
        writer.add_tensor(tensor_name(gguf.MODEL_TENSOR.OUTPUT), gguf.quants.quantize(
            output, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(tensor_name(gguf.MODEL_TENSOR.OUTPUT),
                          output.astype(np.float16 if output_type == "f16" else np.float32))
    writer.add_tensor("token_embd.weight", rng.normal(size=(32, 64)).astype(np.float16))
    writer.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(
        rng.normal(size=(64, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0),
        raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {f.name: (f.contents(), list(f.types)) for f in reader.fields.values()
              if not f.name.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type, np.array(t.data)) for t in reader.tensors}
    return fields, tensors


# What llama.cpp's current converter writes for each export (docs/llamacpp.md): the rewrite's input.
CONVERTER_ROPE_KEYS = {
    "linear": [(ROPE.SCALING_TYPE, "linear", gguf.GGUFValueType.STRING),
               (ROPE.SCALING_FACTOR, 8.0, gguf.GGUFValueType.FLOAT32)],
    "yarn": [(ROPE.SCALING_TYPE, "yarn", gguf.GGUFValueType.STRING),
             (ROPE.SCALING_FACTOR, 8.0, gguf.GGUFValueType.FLOAT32),
             (ROPE.SCALING_ORIG_CTX_LEN, 64, gguf.GGUFValueType.UINT32),
             (ROPE.SCALING_YARN_ATTN_FACTOR, 1.2079, gguf.GGUFValueType.FLOAT32),
             (ROPE.SCALING_YARN_BETA_FAST, 32.0, gguf.GGUFValueType.FLOAT32)],
    "yarn-revised": [(ROPE.SCALING_TYPE, "longrope", gguf.GGUFValueType.STRING)],
}
CONVERTER_ROPE_KEYS["yarn-betas"] = CONVERTER_ROPE_KEYS["yarn-attention-factor"] = CONVERTER_ROPE_KEYS["yarn"]

# The RoPE keys llama.cpp's LLaMA runtime must find (beyond rope.freq_base) for each type.
EXPECTED_SCALING = {
    "default": {}, "ntk": {}, "llama3": {},
    "linear": {ROPE.SCALING_TYPE: "linear", ROPE.SCALING_FACTOR: 8.0},
    "yarn": {ROPE.SCALING_TYPE: "yarn", ROPE.SCALING_FACTOR: 8.0, ROPE.SCALING_ORIG_CTX_LEN: 64},
    **{kind: {ROPE.SCALING_TYPE: "longrope", ROPE.SCALING_ORIG_CTX_LEN: 64, ROPE.SCALING_ATTN_FACTOR: af}
       for kind, af in (("yarn-revised", 0.1 * math.log(8) + 1), ("yarn-betas", 0.1 * math.log(8) + 1),
                        ("yarn-attention-factor", 1.5))},
}
FACTOR_TENSORS = {"llama3": [gguf.MODEL_TENSOR.ROPE_FREQS],
                  **{kind: [gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT]
                     for kind in ("yarn-revised", "yarn-betas", "yarn-attention-factor")}}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_rewrite_writes_the_rope_llama_cpp_needs_and_copies_everything_else(tmp_path, kind):
    scaling = CASES[kind]
    extra = {}
    if kind == "llama3":  # the converter's own rope_freqs, computed independently
        extra[tensor_name(gguf.MODEL_TENSOR.ROPE_FREQS)] = np.ones(HEAD // 2, np.float32)
    write_converted_gguf(tmp_path / "in.gguf", rope_keys=CONVERTER_ROPE_KEYS.get(kind, ()), extra_tensors=extra)
    plan = gguf_rope_for(scaling, TINY.rotary_base, HEAD)
    changes = rewrite_gguf(tmp_path / "in.gguf", tmp_path / "out.gguf", plan, arch=ARCH)
    before, before_tensors = read(tmp_path / "in.gguf")
    after, after_tensors = read(tmp_path / "out.gguf")

    rope_keys = {name for name in after if name.startswith(key(ROPE.FREQ_BASE).rsplit(".", 1)[0])}
    rope_keys.discard(key(ROPE.DIMENSION_COUNT))
    expected = {key(ROPE.FREQ_BASE): compute_freq_base(scaling),
                **{key(name): value for name, value in EXPECTED_SCALING[kind].items()}}
    assert rope_keys == set(expected), changes
    for name, value in expected.items():
        assert after[name][0] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), name
    for name, (value, types) in before.items():  # the rest is untouched, types included
        if name not in rope_keys and not name.startswith(key(ROPE.SCALING_TYPE).rsplit(".", 1)[0]):
            assert after[name] == (value, types), name
    assert [name for name in after if name == gguf.Keys.General.ARCHITECTURE] == [gguf.Keys.General.ARCHITECTURE]

    factor_names = {tensor_name(k) for k in FACTOR_TENSORS.get(kind, [])}
    assert set(after_tensors) == (set(before_tensors) - {tensor_name(gguf.MODEL_TENSOR.ROPE_FREQS)}) | factor_names
    for name, (qtype, data) in before_tensors.items():
        if name not in factor_names:  # raw bytes and type, quantised ones too
            assert after_tensors[name][0] == qtype and after_tensors[name][1].tobytes() == data.tobytes(), name
    plain, _ = compute_inv_freq(RopeScaling("default"), HEAD, TINY.rotary_base)
    trained, _ = compute_inv_freq(scaling, HEAD, TINY.rotary_base)
    for name in factor_names:  # llama.cpp divides each plain frequency by its factor
        qtype, factors = after_tensors[name]
        assert qtype == gguf.GGMLQuantizationType.F32 and factors.shape == (HEAD // 2,)
        np.testing.assert_allclose(plain.numpy() / factors, trained.numpy(), rtol=1e-6)
    if kind == "yarn-revised":  # = the longrope factors of the config.json export
        np.testing.assert_allclose(after_tensors[tensor_name(gguf.MODEL_TENSOR.ROPE_FACTORS_LONG)][1],
                                   yarn_revised_ext_factors(scaling, HEAD, TINY.rotary_base), rtol=1e-6)


def compute_freq_base(scaling):
    from pose_megatron.rope import ntk_scaled_base
    return ntk_scaled_base(TINY.rotary_base, 8.0, HEAD) if scaling.rope_type == "ntk" else TINY.rotary_base


def test_rewrite_reports_what_it_changed(tmp_path):
    write_converted_gguf(tmp_path / "in.gguf", rope_keys=CONVERTER_ROPE_KEYS["yarn-attention-factor"])
    plan = gguf_rope_for(CASES["yarn-attention-factor"], TINY.rotary_base, HEAD)
    changes = rewrite_gguf(tmp_path / "in.gguf", tmp_path / "out.gguf", plan)
    assert f"{key(ROPE.SCALING_TYPE)}: 'yarn' -> 'longrope'" in changes
    assert any(c.startswith(f"removed {key(ROPE.SCALING_FACTOR)}") for c in changes)
    assert f"added {key(ROPE.SCALING_ATTN_FACTOR)} = 1.5" in changes
    assert f"added tensor {tensor_name(gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)} [8]" in changes
    # Rewriting the result again changes nothing: it already says the plan.
    assert rewrite_gguf(tmp_path / "out.gguf", tmp_path / "again.gguf", plan) == []


@pytest.mark.parametrize("output_type", ["f32", "f16"])
def test_normhead_rows_are_normalised(tmp_path, output_type):
    write_converted_gguf(tmp_path / "in.gguf", output_type=output_type)
    rewrite_gguf(tmp_path / "in.gguf", tmp_path / "out.gguf", gguf_rope_for(RopeScaling(), 1e4, HEAD),
                 normalise_output=True)
    _, before = read(tmp_path / "in.gguf")
    _, after = read(tmp_path / "out.gguf")
    name = tensor_name(gguf.MODEL_TENSOR.OUTPUT)
    raw, normalised = before[name][1].astype(np.float64), after[name][1].astype(np.float64)
    assert after[name][0] == before[name][0] and normalised.shape == raw.shape == (32, 64)
    np.testing.assert_allclose(np.linalg.norm(normalised, axis=1), 1.0, rtol=2e-3 if output_type == "f16" else 1e-6)
    expected = torch.nn.functional.normalize(torch.from_numpy(raw), dim=-1).numpy()  # Baichuan2's NormHead
    np.testing.assert_allclose(normalised, expected, atol=1e-3 if output_type == "f16" else 1e-7)


def test_normhead_of_a_quantised_output_is_refused(tmp_path):
    write_converted_gguf(tmp_path / "in.gguf", output_type="q8_0")
    with pytest.raises(ConversionError, match="only be normalised in F32 or F16"):
        rewrite_gguf(tmp_path / "in.gguf", tmp_path / "out.gguf", gguf_rope_for(RopeScaling(), 1e4, HEAD),
                     normalise_output=True)


def test_a_gguf_of_another_architecture_is_refused(tmp_path):
    write_converted_gguf(tmp_path / "in.gguf", arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BAICHUAN])
    with pytest.raises(ConversionError, match="is a 'baichuan' GGUF, expected 'llama'"):
        rewrite_gguf(tmp_path / "in.gguf", tmp_path / "out.gguf", gguf_rope_for(RopeScaling(), 1e4, HEAD),
                     arch=ARCH)


def exported_info(family, scaling, layers):
    model = dataclasses.replace(TINY, num_layers=layers, num_query_groups=TINY.num_attention_heads,
                                norm_head=FAMILIES[family].norm_head)
    config = hf_config_for_export(model, scaling, FAMILIES[family], 512, torch.float32, seq_length=64)
    return model_info_from_hf_config(json.loads(json.dumps(config)))


@pytest.mark.parametrize("kind", sorted(CASES))
def test_what_llama_cpp_cannot_run_is_refused_with_the_reason(kind):
    plan_gguf_rope(exported_info("llama", CASES[kind], 2))  # LLaMA: every type
    baichuan = exported_info("baichuan2", CASES[kind], 32)
    if kind in ("default", "ntk", "linear", "yarn"):
        assert plan_gguf_rope(baichuan).freq_factors is None
    else:
        with pytest.raises(ConversionError, match="src/models/baichuan.cpp.*passes no per-frequency factors"):
            plan_gguf_rope(baichuan)
    if kind == "default":
        with pytest.raises(ConversionError, match="only to 32-layer models.*without any position information"):
            plan_gguf_rope(exported_info("baichuan2", CASES[kind], 2))


def write_export(path, family="llama", scaling=RopeScaling(), layers=2, tokenizer=True):
    path.mkdir()
    info = exported_info(family, scaling, layers)
    (path / "config.json").write_text(json.dumps(info.source))
    if tokenizer:
        (path / "tokenizer.model").write_bytes(b"\x00")
    return path


def test_export_refuses_before_any_work(tmp_path):
    llama_cpp = tmp_path / "llama.cpp"
    llama_cpp.mkdir()
    out = tmp_path / "out" / "model.gguf"
    cases = [
        (write_export(tmp_path / "no-tok", tokenizer=False), "f32", "no tokenizer.model or tokenizer.json"),
        (write_export(tmp_path / "q8", "baichuan2", layers=32), "q8_0", "use outtype f32 or f16"),
        (write_export(tmp_path / "rev", "baichuan2", CASES["yarn-revised"], 32), "f32", "per-frequency"),
        (write_export(tmp_path / "ok"), "f4", "outtype 'f4' is not one of"),
        (tmp_path / "ok", "f32", "convert_hf_to_gguf.py not found: --llama-cpp must be a llama.cpp checkout"),
    ]
    for hf_dir, outtype, message in cases:
        with pytest.raises(ConversionError, match=message):
            export_gguf(hf_dir, out, llama_cpp, outtype=outtype, quiet=True)
    assert not (tmp_path / "out").exists()
    assert plan_gguf_export(tmp_path / "ok").arch == ARCH


def test_an_existing_output_is_kept_unless_overwrite(tmp_path):
    hf_dir = write_export(tmp_path / "hf")
    (tmp_path / "llama.cpp").mkdir()
    (tmp_path / "llama.cpp" / "convert_hf_to_gguf.py").write_text("raise SystemExit(3)\n")
    out = tmp_path / "model.gguf"
    out.write_bytes(b"mine")
    with pytest.raises(ConversionError, match="exists; pass --overwrite"):
        export_gguf(hf_dir, out, tmp_path / "llama.cpp", quiet=True)
    # A converter that fails leaves the old file and no temporary behind.
    with pytest.raises(ConversionError, match="converter failed with exit status 3"):
        export_gguf(hf_dir, out, tmp_path / "llama.cpp", overwrite=True, quiet=True)
    assert out.read_bytes() == b"mine" and sorted(os.listdir(tmp_path)) == ["hf", "llama.cpp", "model.gguf"]


def test_the_baichuan_converter_bug_is_named_with_the_fix(tmp_path):
    """llama.cpp 0c1e570's Baichuan converter recurses until Python gives up (docs/reference.md)."""
    hf_dir = write_export(tmp_path / "hf", "baichuan2", layers=32)
    (tmp_path / "llama.cpp").mkdir()
    (tmp_path / "llama.cpp" / "convert_hf_to_gguf.py").write_text(
        "def modify_tensors():\n    yield from modify_tensors()\nlist(modify_tensors())\n")
    with pytest.raises(ConversionError, match="Baichuan converter calls its own modify_tensors.*"
                       "early-2025.*converter failed with exit status 1"):
        export_gguf(hf_dir, tmp_path / "model.gguf", tmp_path / "llama.cpp", quiet=True)
    assert not (tmp_path / "model.gguf").exists()
