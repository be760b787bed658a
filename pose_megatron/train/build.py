"""Building a training run: the model and optimizer, the data, the checkpoint and the reporter.

PoseGPTModel -> (Float16Module for bf16/fp16) -> megatron DistributedDataParallel; get_megatron_optimizer
(optionally the distributed optimizer) with OptimizerParamScheduler. Each piece is built from the
`TrainingRun` the CLI validated; nothing here reads flags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from pose_megatron import runtime
from pose_megatron.checkpoint.families import family_for_model
from pose_megatron.checkpoint.layout import RunConfig
from pose_megatron.checkpoint.training_state import (
    TrainingProgress,
    load_training_checkpoint,
)
from pose_megatron.data_checks import DataError
from pose_megatron.loader import build_data_iterator, build_pose_datasets
from pose_megatron.model import build_model, build_transformer_config
from pose_megatron.presets import ModelConfig
from pose_megatron.rope import RopeScaling
from pose_megatron.train.arguments import data_blend
from pose_megatron.train.config import TrainingConfig, TrainingRun
from pose_megatron.train.progress import ProgressReporter, model_flops_per_token


def resolve_precision(training: TrainingConfig) -> str:
    if training.precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    return training.precision


def setup_model_and_optimizer(model_cfg: ModelConfig, rope: RopeScaling, training: TrainingConfig,
                              seq_length: int, tp: int, pp: int, *, global_batch_size: int):
    """(DDP-wrapped model, optimizer, scheduler) for this rank's pipeline stage. The scheduler
    counts samples, as Megatron-LM's does: train_step advances it by the global batch."""
    precision = resolve_precision(training)
    dtype = runtime.dtype_from_name(precision)
    use_te = runtime.transformer_engine_usable()
    tconfig = build_transformer_config(
        model_cfg, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        # TE's fused RoPE takes one position sequence per micro-batch: only with micro-batch 1.
        apply_rope_fusion=use_te and training.micro_batch_size == 1,
        recompute_activations=training.recompute_activations,
        init_method_std=training.init_method_std,
    )
    model = build_model(
        model_cfg, tconfig, rope,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        use_transformer_engine=use_te, max_sequence_length=seq_length,
    )
    if precision != "fp32":
        model = Float16Module(tconfig, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=training.use_distributed_optimizer,
    )
    ddp_model = DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=model)
    opt_config = OptimizerConfig(
        optimizer="adam", lr=training.lr, min_lr=training.min_lr,
        weight_decay=training.weight_decay, adam_beta1=training.adam_beta1,
        adam_beta2=training.adam_beta2, adam_eps=training.adam_eps, clip_grad=training.clip_grad,
        bf16=precision == "bf16", fp16=precision == "fp16", params_dtype=dtype,
        use_distributed_optimizer=training.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, [ddp_model])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, **training.schedule_in_samples(global_batch_size),
        # On resume: refuse a differing schedule unless told which to take (checked before
        # loading, with the flags named: checkpoint/resume_checks.py).
        use_checkpoint_opt_param_scheduler=training.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=training.override_opt_param_scheduler,
    )
    # The schedules call these: DP gradient sync at the end of backward, loss scaling for fp16.
    tconfig.no_sync_func = ddp_model.no_sync
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    return ddp_model, optimizer, scheduler


@dataclass
class Trainer:
    """What the loop works on: built once by `build_trainer`."""

    run: TrainingRun
    model: DistributedDataParallel
    optimizer: object
    scheduler: OptimizerParamScheduler
    progress: TrainingProgress
    train_iter: Iterator[dict]
    valid_dataset: Optional[torch.utils.data.Dataset]
    run_config: RunConfig
    """What every save stores in pose_config.json."""
    reporter: ProgressReporter

    def valid_iter(self) -> Iterator[dict]:
        """A fresh pass over the validation split (every pass scores the same batches)."""
        return build_data_iterator(self.valid_dataset, 0, self.run.training.micro_batch_size,
                                   parallel_state.get_data_parallel_rank(),
                                   parallel_state.get_data_parallel_world_size(), 0)


def build_trainer(run: TrainingRun) -> Trainer:
    """Processes, model, optimizer, checkpoint, data and reporter for `run` (collective)."""
    from pose_megatron.tokenizer import build_tokenizer

    training, data, parallel = run.training, run.data, run.parallel
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    runtime.initialize_distributed()
    runtime.initialize_model_parallel(tp, pp)
    runtime.set_seed(training.seed)

    # The data first: a bad file fails before the model is built.
    tokenizer = build_tokenizer(data.tokenizer_type, data.tokenizer_model)
    train_ds, valid_ds = _build_datasets(run, tokenizer)
    model, optimizer, scheduler = setup_model_and_optimizer(
        run.model, run.rope, training, run.pose.seq_length, tp, pp,
        global_batch_size=run.global_batch_size)
    progress = TrainingProgress()
    if training.load:
        progress = load_training_checkpoint(training.load, model.module, optimizer, scheduler,
                                            run.load_options()) or progress
    train_iter = build_data_iterator(
        train_ds, progress.consumed_train_samples, training.micro_batch_size,
        parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
        data.num_workers)
    reporter = _build_reporter(run, model, progress, len(train_ds))
    return Trainer(run=run, model=model, optimizer=optimizer, scheduler=scheduler,
                   progress=progress, train_iter=train_iter, valid_dataset=valid_ds,
                   run_config=_run_config(run), reporter=reporter)


def checkpoint_args(run: TrainingRun) -> dict:
    """The run's fields for its checkpoints' Megatron-LM `args` (plus the layer implementation)."""
    fields = run.megatron_lm_fields()
    fields["transformer_impl"] = "transformer_engine" if runtime.transformer_engine_usable() else "local"
    return fields


def _build_datasets(run: TrainingRun, tokenizer):
    training = run.training
    global_batch = run.global_batch_size
    num_evals = training.train_iters // training.eval_interval + 1 if training.eval_iters else 0
    sizes = [training.train_iters * global_batch, num_evals and training.eval_iters * global_batch, 0]
    prefixes, weights = data_blend(run.data.data_path)
    # megatron-core's builder builds the index caches on rank 0 first, then the others read them.
    train_ds, valid_ds, _ = build_pose_datasets(
        prefixes, weights, run.data.split, sizes, training.seed, tokenizer, run.pose,
        min_doc_length=run.data.min_doc_length, path_to_cache=run.data.data_cache_path)
    if training.eval_iters and (valid_ds is None or len(valid_ds) == 0):
        raise DataError(f"the validation split of --split {run.data.split} holds no documents of "
                        "the kept length, but --eval-iters asks for validation; give it a larger "
                        "share, or pass --eval-iters 0")
    return train_ds, valid_ds


def _run_config(run: TrainingRun) -> RunConfig:
    """The checkpoint's record of this run; provenance carries forward (the importer's hf_config
    lets the exporter rebuild config.json)."""
    stored = run.stored
    extra = dict(stored.extra) if stored else {}
    extra.update(tokenizer_model=os.path.abspath(run.data.tokenizer_model),
                 padded_vocab_size=run.model.padded_vocab_size(run.parallel.tensor_model_parallel_size))
    family = stored.family if stored else family_for_model(run.model).name
    return RunConfig(model=run.model, rope_scaling=run.rope, family=family,
                     seq_length=run.pose.seq_length, target_length=run.pose.target_length,
                     extra=extra)


def _build_reporter(run: TrainingRun, model, progress: TrainingProgress,
                    num_samples: int) -> ProgressReporter:
    training, pose, cfg = run.training, run.pose, run.model
    count = torch.tensor([sum(p.numel() for p in model.parameters())], device=runtime.get_device())
    dist.all_reduce(count, group=parallel_state.get_model_parallel_group())
    num_params = int(count.item())
    reporter = ProgressReporter(
        training.train_iters, progress.iteration, run.global_batch_size * pose.seq_length,
        model_flops_per_token(num_params, cfg.num_layers, cfg.hidden_size, pose.seq_length),
        dist.get_world_size(), is_reporting_rank=dist.get_rank() == dist.get_world_size() - 1,
        tensorboard_dir=training.tensorboard_dir, metrics_file=training.metrics_file,
    )
    parallel = run.parallel
    if pose.is_randpos and pose.content == "skip":
        reporter.write("RandPos (--pose-num-chunks = --seq-length): every sample's text is contiguous; "
                       "--pose-content does not apply")
    reporter.write(
        f"PoSE training: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {num_params:,} "
        f"parameters | seq {pose.seq_length} -> target {pose.target_length}, rope "
        f"{run.rope.rope_type} x{run.rope.factor:g} | TP {parallel.tensor_model_parallel_size} PP "
        f"{parallel.pipeline_model_parallel_size} DP {parallel_state.get_data_parallel_world_size()} "
        f"| global batch {run.global_batch_size} ({run.num_microbatches} micro-batches of "
        f"{training.micro_batch_size}) | {resolve_precision(training)} | {num_samples} training samples"
    )
    return reporter

