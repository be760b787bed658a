"""The trainer's own settings, and `TrainingRun`: every config a run is built from, validated once.

The model, RoPE and PoSE settings are the dataclasses of the modules they configure
(`presets.ModelConfig`, `rope.RopeScaling`, `positions.PoseSampling`); this module adds the ones only
the trainer has. Flags are generated from these fields and their docstrings (train/arguments.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

from pose_megatron.checkpoint.layout import RunConfig
from pose_megatron.positions import PoseSampling
from pose_megatron.presets import ModelConfig
from pose_megatron.rope import RopeScaling

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LR_DECAY_STYLES = ("constant", "linear", "cosine")
TOKENIZER_TYPES = ("sentencepiece", "huggingface")


@dataclass
class ParallelConfig:
    """How the model is split over the processes."""

    tensor_model_parallel_size: int = 1
    """TP: ranks that split each layer's weights."""
    pipeline_model_parallel_size: int = 1
    """PP: pipeline stages (layers split in order)."""


@dataclass
class DataConfig:
    """Where training text comes from."""

    data_path: List[str] = field(default_factory=list)
    """Indexed-dataset prefixes, or Megatron's "weight prefix weight prefix ..." blend
    (tools/preprocess_data.py makes them; tools/build_sample_corpus.py prints the bundled corpus's)."""
    split: str = "969,30,1"
    """Train / valid / test proportions of the documents."""
    tokenizer_type: str = field(default="sentencepiece", metadata={"choices": TOKENIZER_TYPES})
    """sentencepiece or huggingface."""
    tokenizer_model: Optional[str] = None
    """Tokenizer file (sentencepiece .model) or directory (huggingface)."""
    data_cache_path: Optional[str] = None
    """Where dataset index caches go (default: next to the data)."""
    num_workers: int = 0
    """DataLoader worker processes per rank (samples are cheap to cut; 0 is usually right)."""
    min_doc_length: Optional[int] = None
    """Skip documents shorter than this many tokens (default: seq length + 1, as the paper filtered)."""

    def __post_init__(self):
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.min_doc_length is not None and self.min_doc_length < 1:
            raise ValueError(f"--pose-min-doc-length must be >= 1, got {self.min_doc_length}")

    @property
    def split_shares(self) -> List[float]:
        """The train / valid / test shares of --split (Megatron's "969,30,1" or "98/1/1")."""
        parts = self.split.replace("/", ",").split(",")
        try:
            shares = [float(p) for p in parts]
        except ValueError:
            shares = []
        if not 1 <= len(shares) <= 3 or any(s < 0 for s in shares) or sum(shares) <= 0:
            raise ValueError(f"--split {self.split!r} must be up to three non-negative shares with a "
                             "positive sum, e.g. 969,30,1")
        return shares + [0.0] * (3 - len(shares))


@dataclass
class TrainingConfig:
    """The optimisation run. Defaults are the PoSE paper's recipe (docs/reference.md, "Paper results")."""

    train_iters: int = 1000
    """Optimizer steps."""
    micro_batch_size: int = 1
    """Samples per forward pass per data-parallel rank."""
    global_batch_size: Optional[int] = None
    """Samples per optimizer step (default: micro batch x data-parallel size)."""
    lr: float = 2e-5
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    lr_warmup_iters: int = 10
    """Linear warm-up steps from 0 to lr."""
    lr_decay_style: str = field(default="linear", metadata={"choices": LR_DECAY_STYLES})
    """constant, linear or cosine decay after warm-up."""
    lr_decay_iters: Optional[int] = None
    """Steps over which lr decays to min_lr (default: train_iters)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Gradient-norm clipping threshold (0 disables)."""
    precision: str = field(default="auto", metadata={"choices": PRECISIONS})
    """fp32, bf16 or fp16 (dynamic loss scaling); auto: bf16 on GPU, fp32 on CPU."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""
    recompute_activations: bool = False
    """Recompute each layer's activations in the backward pass (less memory, ~1/3 more compute)."""
    seed: int = 1234
    """Seed of initialisation and of the PoSE sampler."""
    init_method_std: float = 0.02
    """Std of the normal weight initialisation (models trained from scratch)."""
    log_interval: int = 10
    """Steps between log lines."""
    eval_interval: int = 1000
    """Steps between validation passes."""
    eval_iters: int = 10
    """Validation batches per pass (0 disables validation)."""
    save: Optional[str] = None
    """Checkpoint directory (Megatron layout: iter_XXXXXXX/, latest_checkpointed_iteration.txt)."""
    save_interval: Optional[int] = None
    """Steps between checkpoints (a checkpoint is also written at the end and on SIGTERM)."""
    load: Optional[str] = None
    """Checkpoint to resume from (model, optimizer, scheduler, RNG, iteration, consumed samples): this
    trainer's, a converted one, or a torch_dist checkpoint of stock Megatron-LM (its args give the
    architecture)."""
    finetune: bool = False
    """With --load: take the weights only; iteration, optimizer and schedule start afresh."""
    no_load_optim: bool = False
    """With --load: do not restore optimizer state (needed when TP/PP changed); the schedule and
    iteration still continue from the checkpoint."""
    no_load_rng: bool = False
    """With --load: do not restore the RNG state (needed for a checkpoint saved on another kind of
    machine: CPU vs GPU)."""
    override_opt_param_scheduler: bool = False
    """With --load: continue with the learning-rate and weight-decay schedule of these flags (--lr,
    --min-lr, --lr-*, --train-iters, --weight-decay) from the checkpoint's sample count, instead of
    the checkpoint's schedule (Megatron-LM's flag)."""
    use_checkpoint_opt_param_scheduler: bool = False
    """With --load: continue with the checkpoint's schedule, whatever these flags say (Megatron-LM's
    flag). Without either flag a resume whose schedule differs from the checkpoint's is refused."""
    tensorboard_dir: Optional[str] = None
    """Write TensorBoard scalars here."""
    metrics_file: Optional[str] = None
    """Append every step's loss, lr, grad norm, ms/it, tokens/s and peak memory as JSON lines."""
    exit_interval: Optional[int] = None
    """Stop (after saving) once the iteration is a multiple of this; for tests and job chaining."""
    overwrite_save: bool = False
    """Let a fresh run write into a --save that holds another run's checkpoints (replacing them)."""

    def __post_init__(self):
        positive = ("train_iters", "micro_batch_size", "log_interval", "eval_interval")
        optional_positive = ("global_batch_size", "lr_decay_iters", "save_interval", "exit_interval")
        for name in positive + optional_positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                hint = " (leave it out to save only at the end)" if name == "save_interval" else ""
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}{hint}")
        for name in ("eval_iters", "lr_warmup_iters"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ValueError("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler "
                             "contradict each other (take the flags' schedule, or the checkpoint's); "
                             "pass one")

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.train_iters

    def schedule_in_samples(self, global_batch_size: int) -> dict:
        """The OptimizerParamScheduler settings, counted in samples as Megatron-LM counts them (the
        scheduler steps by the global batch): warm-up, decay and weight-decay lengths are these
        iteration counts times the global batch, so every learning rate is the same rational
        number of steps as with iteration counts."""
        return dict(max_lr=self.lr, min_lr=self.min_lr,
                    lr_warmup_steps=self.lr_warmup_iters * global_batch_size,
                    lr_decay_steps=self.decay_iters * global_batch_size,
                    lr_decay_style=self.lr_decay_style, start_wd=self.weight_decay,
                    end_wd=self.weight_decay, wd_incr_steps=self.train_iters * global_batch_size,
                    wd_incr_style="constant")


# TrainingConfig fields that are Megatron-LM arguments of the same name and meaning.
_MEGATRON_LM_TRAINING_FIELDS = (
    "train_iters", "micro_batch_size", "lr", "min_lr", "lr_warmup_iters", "lr_decay_style",
    "lr_decay_iters", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad",
    "use_distributed_optimizer", "recompute_activations", "seed", "log_interval", "eval_interval",
    "eval_iters", "save", "save_interval", "load", "finetune", "no_load_optim", "no_load_rng",
    "tensorboard_dir", "exit_interval", "override_opt_param_scheduler",
    "use_checkpoint_opt_param_scheduler",
)


@dataclass
class TrainingRun:
    """Everything one training run is built from: each config built and validated once, by the CLI
    (train/arguments.py) or by a caller, then passed down as is."""

    model: ModelConfig
    """The architecture (vocab_size is the tokenizer's, or the loaded checkpoint's)."""
    rope: RopeScaling
    """The RoPE scaling trained with."""
    pose: PoseSampling
    """How samples are cut (seq_length is the training window)."""
    training: TrainingConfig
    data: DataConfig
    parallel: ParallelConfig
    stored: Optional[RunConfig] = None
    """The run configuration stored in the --load checkpoint, if it has one."""
    world_size: int = 1
    """Processes the run was validated for."""

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.parallel.tensor_model_parallel_size
                                   * self.parallel.pipeline_model_parallel_size)

    @property
    def global_batch_size(self) -> int:
        t = self.training
        return t.global_batch_size or t.micro_batch_size * self.data_parallel_size

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.training.micro_batch_size * self.data_parallel_size)

    @property
    def schedule(self) -> dict:
        """The LR / weight-decay schedule of this run, in samples (TrainingConfig.schedule_in_samples)."""
        return self.training.schedule_in_samples(self.global_batch_size)

    @property
    def layout(self) -> tuple:
        """(TP, PP, DP) this run trains at."""
        return (self.parallel.tensor_model_parallel_size, self.parallel.pipeline_model_parallel_size,
                self.data_parallel_size)

    def load_options(self):
        """How this run resumes its --load checkpoint (checkpoint.resume_checks.LoadOptions)."""
        from pose_megatron.checkpoint.resume_checks import LoadOptions

        t = self.training
        return LoadOptions(
            global_batch_size=self.global_batch_size, expected_schedule=self.schedule,
            use_distributed_optimizer=t.use_distributed_optimizer, finetune=t.finetune,
            no_load_optim=t.no_load_optim, no_load_rng=t.no_load_rng,
            override_opt_param_scheduler=t.override_opt_param_scheduler,
            use_checkpoint_opt_param_scheduler=t.use_checkpoint_opt_param_scheduler)

    def megatron_lm_fields(self) -> dict:
        """This run's settings under Megatron-LM's argument names, for the `args` of its checkpoints
        (the architecture and progress are added by checkpoint.megatron_args)."""
        from pose_megatron.checkpoint.megatron_args import TOKENIZER_TYPES

        t, d = self.training, self.data
        fields = {name: getattr(t, name) for name in _MEGATRON_LM_TRAINING_FIELDS}
        fields.update(
            global_batch_size=self.global_batch_size, optimizer="adam", lr_warmup_init=0.0,
            start_weight_decay=t.weight_decay, end_weight_decay=t.weight_decay,
            weight_decay_incr_style="constant", seq_length=self.pose.seq_length,
            data_path=list(d.data_path), split=d.split, data_cache_path=d.data_cache_path,
            num_workers=d.num_workers, tokenizer_type=TOKENIZER_TYPES[d.tokenizer_type],
            tokenizer_model=os.path.abspath(d.tokenizer_model) if d.tokenizer_model else None,
            init_method_std=t.init_method_std,
        )
        return fields

    @property
    def resuming(self) -> bool:
        """--load of a training checkpoint (not an import) without --finetune: the run continues."""
        return (self.stored is not None and self.stored.seq_length is not None
                and not self.training.finetune)
