"""Bad input to the converters: a clear ConversionError, and nothing left that looks like a checkpoint."""

import dataclasses
import json

import pytest
import torch

from pose_megatron.checkpoint.dcp_stream import DistCheckpointReader
from pose_megatron.checkpoint.errors import ConversionError
from pose_megatron.checkpoint.hf_export import convert_megatron_to_hf
from pose_megatron.checkpoint.hf_import import convert_hf_to_megatron
from pose_megatron.checkpoint.hf_io import HFWeights
from pose_megatron.checkpoint.layout import load_run_config, write_tracker
from pose_megatron.checkpoint.megatron_keys import QKV
from pose_megatron.checkpoint.vocab_padding import check_vocab_padding
from tiny_models import ROPE_CASES, TINY, hf_llama


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A valid tiny HF LLaMA in three safetensors shards (tests copy it before breaking it)."""
    path = tmp_path_factory.mktemp("hf") / "model"
    hf_llama(TINY, ROPE_CASES["linear"]).save_pretrained(path, max_shard_size="60KB")
    return path


@pytest.fixture
def broken(hf_dir, tmp_path):
    import shutil

    copy = tmp_path / "hf"
    shutil.copytree(hf_dir, copy)
    return copy


def assert_no_checkpoint(save):
    assert not save.exists() or not any(save.iterdir()), sorted(save.iterdir())


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes,message", [
    ({"hidden_size": None}, r"missing the required field.*hidden_size"),
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "unsupported model: model_type 'gpt2'"),
    ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic NTK"),
    ({"rope_parameters": None, "rope_scaling": {"rope_type": "su", "factor": 2.0}},
     "unknown RoPE scaling type 'su'"),
    ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0, "alpha": 1}},
     r"unknown field\(s\) \['alpha'\]"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 1e4, "truncate": False}},
     "truncate=False is not supported"),
    ({"attention_bias": True}, "no biases"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"head_dim": 32}, "head_dim 32 differs"),
    ({"num_key_value_heads": 3}, "invalid model.*not divisible"),
    ({"intermediate_size": 128}, r"mlp.gate_proj.weight has shape \[96, 64\].*\[128, 64\]"),
])
def test_config_errors(broken, tmp_path, changes, message):
    edit_config(broken, **changes)
    with pytest.raises(ConversionError, match=message):
        convert_hf_to_megatron(broken, tmp_path / "out")
    assert_no_checkpoint(tmp_path / "out")


def test_missing_or_invalid_config_json(broken, tmp_path):
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ConversionError, match="not valid JSON"):
        convert_hf_to_megatron(broken, tmp_path / "out")
    (broken / "config.json").unlink()
    with pytest.raises(ConversionError, match="config.json not found"):
        convert_hf_to_megatron(broken, tmp_path / "out")
    assert_no_checkpoint(tmp_path / "out")


@pytest.mark.parametrize("tp,pp,message", [
    (3, 1, r"tensor-model-parallel-size 3 must divide the attention heads \(4\) and query groups \(2\)"),
    (4, 1, r"tensor-model-parallel-size 4 must divide the attention heads \(4\) and query groups \(2\)"),
    (1, 3, r"pipeline-model-parallel-size 3 must divide the number of layers \(2\)"),
    (0, 1, "tp must be a positive integer"),
])
def test_parallel_sizes_must_divide_the_model(hf_dir, tmp_path, tp, pp, message):
    with pytest.raises(ConversionError, match=message):
        convert_hf_to_megatron(hf_dir, tmp_path / "out", tp=tp, pp=pp)
    assert_no_checkpoint(tmp_path / "out")


def _shards(path):
    return sorted(path.glob("model-*.safetensors"))


def test_truncated_shard(broken, tmp_path):
    shard = _shards(broken)[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(ConversionError, match=f"{shard.name} is truncated.*re-download"):
        convert_hf_to_megatron(broken, tmp_path / "out")
    assert_no_checkpoint(tmp_path / "out")


def test_corrupt_shard_header(broken, tmp_path):
    shard = _shards(broken)[0]
    data = bytearray(shard.read_bytes())
    data[8:24] = b"\xff" * 16  # the JSON header
    shard.write_bytes(bytes(data))
    with pytest.raises(ConversionError, match="not a valid safetensors file: unreadable header"):
        convert_hf_to_megatron(broken, tmp_path / "out")
    assert_no_checkpoint(tmp_path / "out")


def test_missing_shard_and_extra_tensor(broken, tmp_path):
    from safetensors.torch import load_file, save_file

    shard = _shards(broken)[0]
    tensors = load_file(str(shard))
    save_file({**tensors, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, str(shard))
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.q_proj.bias"] = shard.name
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    message = r"no place in a llama model, e.g. \['model.layers.0.self_attn.q_proj.bias'\]"
    with pytest.raises(ConversionError, match=message):
        convert_hf_to_megatron(broken, tmp_path / "out")
    _shards(broken)[-1].unlink()
    with pytest.raises(ConversionError, match="listed in the index but does not exist"):
        convert_hf_to_megatron(broken, tmp_path / "out")
    assert_no_checkpoint(tmp_path / "out")


def test_corrupt_bin_checkpoint(tmp_path):
    hf = hf_llama(TINY, ROPE_CASES["default"])
    (tmp_path / "hf").mkdir()
    hf.config.save_pretrained(tmp_path / "hf")
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    data = (tmp_path / "hf" / "pytorch_model.bin").read_bytes()
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="could not be read as a PyTorch checkpoint"):
        convert_hf_to_megatron(tmp_path / "hf", tmp_path / "out")
    assert_no_checkpoint(tmp_path / "out")


def test_failure_while_writing_leaves_the_previous_checkpoint(hf_dir, tmp_path, monkeypatch):
    save = tmp_path / "out"
    convert_hf_to_megatron(hf_dir, save)
    before = sorted(p.name for p in (save / "release").iterdir())
    reads = {"n": 0}
    real_read = HFWeights.read

    def failing_read(self, name):
        reads["n"] += 1
        if reads["n"] > 5:
            raise OSError("disk went away")
        return real_read(self, name)

    monkeypatch.setattr(HFWeights, "read", failing_read)
    with pytest.raises(OSError, match="disk went away"):
        convert_hf_to_megatron(hf_dir, save, dtype="bf16", overwrite=True)
    assert sorted(p.name for p in save.iterdir()) == ["latest_checkpointed_iteration.txt", "release"]
    assert sorted(p.name for p in (save / "release").iterdir()) == before
    assert load_run_config(save / "release").extra["dtypes"][QKV] == "fp32"
    reads["n"] = 0
    with pytest.raises(OSError):  # into a new directory: nothing at all remains
        convert_hf_to_megatron(hf_dir, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_an_existing_release_is_replaced_only_when_asked(hf_dir, tmp_path):
    save = tmp_path / "out"
    convert_hf_to_megatron(hf_dir, save)
    before = (save / "release" / "pose_config.json").read_text()
    with pytest.raises(ConversionError, match="already exists .*pass --overwrite"):
        convert_hf_to_megatron(hf_dir, save, dtype="bf16")
    assert (save / "release" / "pose_config.json").read_text() == before
    convert_hf_to_megatron(hf_dir, save, dtype="bf16", overwrite=True)
    assert load_run_config(save / "release").extra["dtypes"][QKV] == "bf16"


def test_refuses_to_write_into_a_training_run(hf_dir, tmp_path):
    write_tracker(tmp_path, 100)
    with pytest.raises(ConversionError, match="holds a training run"):
        convert_hf_to_megatron(hf_dir, tmp_path)


def test_export_errors(hf_dir, tmp_path, monkeypatch):
    with pytest.raises(ConversionError, match="does not exist"):
        convert_megatron_to_hf(tmp_path / "nothing", tmp_path / "hf")
    ckpt = convert_hf_to_megatron(hf_dir, tmp_path / "megatron")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(ConversionError, match="exists and is not empty"):
        convert_megatron_to_hf(tmp_path / "megatron", tmp_path / "busy")

    calls = {"n": 0}
    real_read = DistCheckpointReader.read

    def failing_read(self, *args):
        calls["n"] += 1
        if calls["n"] > 4:
            raise OSError("disk went away")
        return real_read(self, *args)

    monkeypatch.setattr(DistCheckpointReader, "read", failing_read)
    with pytest.raises(OSError, match="disk went away"):
        convert_megatron_to_hf(tmp_path / "megatron", tmp_path / "exported")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "megatron"]  # no partial export
    monkeypatch.undo()

    for distcp in ckpt.glob("*.distcp"):
        distcp.write_bytes(distcp.read_bytes()[:1000])
    with pytest.raises(ConversionError, match="failed.*incomplete or corrupt"):
        convert_megatron_to_hf(tmp_path / "megatron", tmp_path / "exported")
    (ckpt / "pose_config.json").unlink()
    with pytest.raises(ConversionError, match="no pose_config.json"):
        convert_megatron_to_hf(tmp_path / "megatron", tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


def test_other_vocab_padding_loads_real_rows_and_missing_rows_are_refused(megatron_env, tmp_path):
    """Imported at TP 1, a 300-token vocabulary is padded to 384; at TP 2 the model pads it to 512.
    megatron-core loads the rows both have (allow_shape_mismatch): exact for the real vocabulary."""
    from pose_megatron.checkpoint.megatron_io import load_model_weights
    from tiny_models import pose_llama

    cfg = dataclasses.replace(TINY, vocab_size=300)
    hf = hf_llama(cfg, ROPE_CASES["default"])
    hf.save_pretrained(tmp_path / "hf")
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "megatron", tp=1)
    run = load_run_config(tmp_path / "megatron" / "release")
    assert check_vocab_padding(run, 1) == 384
    assert check_vocab_padding(run, 1, tmp_path / "megatron") == 384
    with pytest.warns(UserWarning, match="padded to 384 rows.*pads it to 512.*rows 384..511 start at zero"):
        assert check_vocab_padding(dataclasses.replace(run, extra={}), 2, tmp_path / "megatron") == 512

    # What TP 2 builds (512 rows), emulated in one process: the real rows load exactly.
    model = pose_llama(dataclasses.replace(cfg, make_vocab_size_divisible_by=256), ROPE_CASES["default"])
    load_model_weights(tmp_path / "megatron", model)
    assert torch.equal(model.output_layer.weight[:300], hf.lm_head.weight)
    assert not model.output_layer.weight[300:].any()

    bigger = dataclasses.replace(run, model=dataclasses.replace(cfg, vocab_size=400))
    with pytest.raises(ValueError, match="holds 384 vocabulary rows but the model has 400 tokens"):
        check_vocab_padding(bigger, 1, tmp_path / "megatron")


def _tool(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_tools(hf_dir, tmp_path, capsys):
    to_megatron, to_hf = _tool("convert_hf_to_megatron"), _tool("convert_megatron_to_hf")
    assert to_megatron.main(["--hf-dir", str(hf_dir), "--save", str(tmp_path / "m"), "--tp", "4"]) == 1
    assert "must divide the attention heads (4) and query groups (2)" in capsys.readouterr().err
    assert to_megatron.main(["--hf-dir", str(hf_dir), "--save", str(tmp_path / "m"), "--tp", "2",
                             "--dtype", "bf16"]) == 0
    assert "padded to 256" in capsys.readouterr().out
    assert to_hf.main(["--load", str(tmp_path / "m"), "--save", str(tmp_path / "hf")]) == 0
    assert "max_position_embeddings 512, rope_type linear" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert to_hf.main(["--load", str(tmp_path / "m"), "--save", str(tmp_path / "hf")]) == 1
    assert "not empty" in capsys.readouterr().err
