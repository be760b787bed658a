"""Megatron-LM directory layout: tracker, atomic saves, the stored run configuration."""

import pytest
import torch

from pose_megatron.checkpoint.layout import (
    RunConfig,
    load_run_config,
    read_tracker,
    resolve_checkpoint_dir,
    write_tracker,
)
from pose_megatron.checkpoint.megatron_io import load_model_weights, save_model_weights
from pose_megatron.rope import RopeScaling
from tiny_models import ROPE_CASES, TINY, pose_llama


def same_weights(a, b) -> bool:
    """Every tensor of two models' state dicts equal (the extra states are not weights)."""
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())
               if isinstance(x, torch.Tensor))


def test_tracker_round_trip_and_bad_content(tmp_path):
    assert read_tracker(tmp_path) is None
    write_tracker(tmp_path, 100)
    assert read_tracker(tmp_path) == 100
    write_tracker(tmp_path, "release")
    assert read_tracker(tmp_path) == "release"
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("garbage")
    with pytest.raises(ValueError, match="iteration number or 'release'"):
        read_tracker(tmp_path)


def test_resolve_reports_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no latest_checkpointed_iteration.txt"):
        resolve_checkpoint_dir(tmp_path)
    write_tracker(tmp_path, 5)  # tracker points at a directory that was never completed
    with pytest.raises(FileNotFoundError, match="iter_0000005 is incomplete"):
        resolve_checkpoint_dir(tmp_path)


def test_weights_and_config_round_trip(megatron_env, tmp_path):
    scaling = ROPE_CASES["yarn-revised"]
    model = pose_llama(TINY, scaling)
    run = RunConfig(model=TINY, rope_scaling=scaling, seq_length=64, target_length=512)
    ckpt = save_model_weights(tmp_path, 3, model, run)
    assert ckpt.name == "iter_0000003" and read_tracker(tmp_path) == 3
    assert not list(tmp_path.glob(".*incomplete"))

    torch.manual_seed(99)
    other = pose_llama(TINY, scaling)
    assert not torch.equal(other.output_layer.weight, model.output_layer.weight)
    loaded = load_model_weights(tmp_path, other)
    assert same_weights(model, other)
    assert loaded == run
    assert load_run_config(ckpt).rope_scaling == scaling


def test_a_save_killed_midway_leaves_the_previous_checkpoint_latest(megatron_env, tmp_path,
                                                                    monkeypatch):
    from pose_megatron.checkpoint import megatron_io

    scaling = ROPE_CASES["linear"]
    model = pose_llama(TINY, scaling)
    run = RunConfig(model=TINY, rope_scaling=scaling)
    save_model_weights(tmp_path, 1, model, run)
    real_save = megatron_io.dist_checkpointing.save

    def dies_halfway(state, directory, **kwargs):
        (tmp_path / ".iter_0000002.incomplete" / "__0_0.distcp").write_bytes(b"partial")
        raise KeyboardInterrupt  # what a kill looks like to the code after it

    monkeypatch.setattr(megatron_io.dist_checkpointing, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_model_weights(tmp_path, 2, model, run)
    assert read_tracker(tmp_path) == 1
    assert not (tmp_path / "iter_0000002").exists()
    assert resolve_checkpoint_dir(tmp_path).name == "iter_0000001"
    assert load_model_weights(tmp_path, pose_llama(TINY, scaling)) == run

    monkeypatch.setattr(megatron_io.dist_checkpointing, "save", real_save)
    save_model_weights(tmp_path, 2, model, run)  # the next save clears the leftover
    assert read_tracker(tmp_path) == 2
    assert not (tmp_path / ".iter_0000002.incomplete").exists()


def test_a_killed_save_over_the_same_iteration_keeps_the_old_copy(megatron_env, tmp_path,
                                                                 monkeypatch):
    """Saving iter_N again (a re-converted release, a rerun that saves at the same step) swaps the
    old copy out only once the new one is complete: a kill midway leaves the old one in place."""
    from pose_megatron.checkpoint import megatron_io

    scaling = ROPE_CASES["linear"]
    run = RunConfig(model=TINY, rope_scaling=scaling)
    torch.manual_seed(1)
    old = pose_llama(TINY, scaling)
    save_model_weights(tmp_path, 1, old, run)
    torch.manual_seed(2)
    new = pose_llama(TINY, scaling)
    real_save = megatron_io.dist_checkpointing.save

    def dies_halfway(state, directory, **kwargs):
        real_save(state, directory, **kwargs)  # every shard written, then killed before the swap
        raise KeyboardInterrupt

    monkeypatch.setattr(megatron_io.dist_checkpointing, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_model_weights(tmp_path, 1, new, run)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000001", "latest_checkpointed_iteration.txt"]  # no half copy, no copy set aside
    loaded = pose_llama(TINY, scaling)
    load_model_weights(tmp_path, loaded)
    assert same_weights(old, loaded) and not same_weights(new, loaded)

    monkeypatch.setattr(megatron_io.dist_checkpointing, "save", real_save)
    save_model_weights(tmp_path, 1, new, run)  # completed, it replaces the old copy
    load_model_weights(tmp_path, loaded)
    assert same_weights(new, loaded)


def test_declared_context_is_the_largest_of_target_scaled_window_and_base_model():
    """max_positions = max(target length, window L_c x factor, the imported base model's value)."""
    base = {"hf_config": {"max_position_embeddings": 256}}  # what the importer keeps
    plain = RunConfig(model=TINY, rope_scaling=RopeScaling(), seq_length=64, target_length=64)
    assert plain.max_positions == 64
    # Plain fine-tuning of an imported 256-position model at a 64-token window keeps 256.
    assert RunConfig(model=TINY, rope_scaling=RopeScaling(), seq_length=64, target_length=64,
                     extra=base).max_positions == 256
    pose = RunConfig(model=TINY, rope_scaling=ROPE_CASES["yarn-revised"], seq_length=64, target_length=512,
                     extra=base)
    assert pose.max_positions == 512
    # A factor larger than target / window: its frequencies cover window x factor.
    wide = RunConfig(model=TINY, rope_scaling=RopeScaling("linear", 16.0), seq_length=64, target_length=512)
    assert wide.max_positions == 1024
    # An import (no run window): the model's window x factor, or the config's own value.
    imported = RunConfig(model=TINY, rope_scaling=RopeScaling("linear", 2.5), target_length=None)
    assert imported.max_positions == 160
    assert RunConfig(model=TINY, rope_scaling=RopeScaling("linear", 2.5), target_length=200,
                     extra={"hf_config": {"max_position_embeddings": 200}}).max_positions == 200
