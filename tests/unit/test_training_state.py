"""Training checkpoints in-process (one gloo process): this project's earlier format still resumes,
and an RNG state from another kind of machine asks for --no-load-rng."""

import random

import numpy as np
import pytest
import torch
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from pose_megatron.checkpoint.layout import RunConfig, save_run_config, write_tracker
from pose_megatron.checkpoint.training_state import (
    LoadOptions,
    _capture_rng,
    _check_generator_states,
    load_training_checkpoint,
)
from pose_megatron.rope import RopeScaling
from pose_megatron.train.build import setup_model_and_optimizer
from pose_megatron.train.config import TrainingConfig
from pose_megatron.train.step import train_step
from tiny_models import TINY

BATCH, SEQ = 4, 16
TRAINING = TrainingConfig(train_iters=6, lr=1e-3, lr_warmup_iters=2, precision="fp32",
                          use_distributed_optimizer=True)


def _built():
    model, optimizer, scheduler = setup_model_and_optimizer(TINY, RopeScaling(), TRAINING, SEQ, 1, 1,
                                                            global_batch_size=BATCH)
    return model, optimizer, scheduler


def _batches(seed):
    g = torch.Generator().manual_seed(seed)
    while True:
        tokens = torch.randint(0, TINY.vocab_size, (BATCH, SEQ + 1), generator=g)
        yield {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(BATCH, SEQ),
               "position_ids": torch.arange(SEQ).expand(BATCH, SEQ)}


def _save_earlier_format(root, model, optimizer, scheduler, iteration):
    """What this project saved before checkpoint_version: the schedule in iterations, the layout
    and consumed samples at the top level, the RNG as one dict per (pp, tp, dp) rank."""
    model_sd = model.module.sharded_state_dict()
    schedule = dict(scheduler.state_dict())
    for key in ("lr_warmup_steps", "lr_decay_steps", "wd_incr_steps", "num_steps"):
        schedule[key] //= BATCH
    rng = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    state = {
        "model": model_sd, "parallel": {"tp": 1, "pp": 1, "dp": 1},
        "rng_state": ShardedObject("rng_state", rng, (1, 1, 1), (0, 0, 0), replica_id=0),
        "optimizer": optimizer.sharded_state_dict(
            model_sd, is_loading=False, metadata={"distrib_optim_sharding_type": "dp_reshardable"}),
        "opt_param_scheduler": schedule, "iteration": iteration,
        "consumed_train_samples": iteration * BATCH,
    }
    ckpt = root / f"iter_{iteration:07d}"
    ckpt.mkdir(parents=True)
    dist_checkpointing.save(state, str(ckpt))
    save_run_config(ckpt, RunConfig(model=TINY, rope_scaling=RopeScaling(), seq_length=SEQ))
    write_tracker(root, iteration)
    return rng


def test_an_earlier_format_checkpoint_resumes_exactly(megatron_env, tmp_path):
    model, optimizer, scheduler = _built()
    data = _batches(0)
    for _ in range(3):
        train_step(model, optimizer, scheduler, data, 1, SEQ, BATCH)
    rng = _save_earlier_format(tmp_path, model, optimizer, scheduler, 3)
    after = _batches(1)  # the second step's loss shows the first one's update
    expected = [train_step(model, optimizer, scheduler, after, 1, SEQ, BATCH) for _ in range(2)]

    torch.manual_seed(5)  # other weights and RNG until the load
    model2, optimizer2, scheduler2 = _built()
    options = LoadOptions(global_batch_size=BATCH, expected_schedule=TRAINING.schedule_in_samples(BATCH),
                          use_distributed_optimizer=True)
    progress = load_training_checkpoint(tmp_path, model2.module, optimizer2, scheduler2, options)
    assert (progress.iteration, progress.consumed_train_samples) == (3, 12)
    assert scheduler2.num_steps == 12 and scheduler2.lr_decay_steps == 24  # iterations -> samples
    assert torch.equal(torch.get_rng_state(), rng["torch"])
    after = _batches(1)
    got = [train_step(model2, optimizer2, scheduler2, after, 1, SEQ, BATCH) for _ in range(2)]
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in got] == \
           [(r["loss"], r["grad_norm"], r["lr"]) for r in expected]
    # The resumed steps counted on from the saved Adam step, one tensor per parameter.
    states = list(optimizer2.chained_optimizers[0].optimizer.state.values())
    assert {float(s["step"]) for s in states} == {5.0}
    assert len({id(s["step"]) for s in states}) == len(states)


def test_rng_state_from_another_kind_of_machine_asks_for_no_load_rng(megatron_env):
    state = _capture_rng()[0]
    assert "cuda_rng_state" not in state  # no CUDA generator here
    _check_generator_states(state, "ckpt")
    cuda_made = dict(state, rng_tracker_states={
        name: torch.zeros(16, dtype=torch.uint8) for name in state["rng_tracker_states"]})
    with pytest.raises(ValueError, match="made with CUDA.*pass --no-load-rng"):
        _check_generator_states(cuda_made, "ckpt")


def test_weights_loaded_without_optimizer_state_reach_the_bf16_main_params(megatron_env, tmp_path):
    """bf16 keeps fp32 main params, copied from the weights when the optimizer is built; loading
    weights afterwards (--finetune, a converted checkpoint, --no-load-optim) must refresh them,
    or the first step writes the random initialisation back. (The distributed optimizer is the
    bf16 optimizer that builds on CPU.)"""
    from pose_megatron.checkpoint.megatron_io import save_model_weights

    bf16 = TrainingConfig(train_iters=4, lr=1e-3, lr_warmup_iters=0, lr_decay_style="constant",
                          precision="bf16", use_distributed_optimizer=True)
    model, _, _ = setup_model_and_optimizer(TINY, RopeScaling(), bf16, SEQ, 1, 1, global_batch_size=BATCH)
    save_model_weights(tmp_path, "release", model.module, RunConfig(model=TINY, rope_scaling=RopeScaling()))
    saved = {k: v.float().clone() for k, v in model.module.state_dict().items()
             if isinstance(v, torch.Tensor) and v.is_floating_point()}
    torch.manual_seed(7)
    other, optimizer, scheduler = setup_model_and_optimizer(TINY, RopeScaling(), bf16, SEQ, 1, 1,
                                                            global_batch_size=BATCH)
    load_training_checkpoint(tmp_path, other.module, optimizer, scheduler, LoadOptions(
        global_batch_size=BATCH, expected_schedule=bf16.schedule_in_samples(BATCH),
        use_distributed_optimizer=True))
    train_step(other, optimizer, scheduler, _batches(0), 1, SEQ, BATCH)
    after = other.module.state_dict()
    moved = max((after[k].float() - v).abs().max().item() for k, v in saved.items())
    assert moved < 5e-3  # one Adam step of lr 1e-3 (and bf16 rounding); the random init is ~1e-1 away
