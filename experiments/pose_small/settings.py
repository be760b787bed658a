"""The scales of the small reproduction, its training runs and the flags of each extension method.

The paper's protocol (docs/reference.md, "Paper results": 1000 steps x 64 sequences for every
method): every extension trains the same steps on the same sequences per step, so full-length
training reads L_t / L_c times the tokens of a PoSE run and pays for them. A second comparison gives
full-length training the tokens of a PoSE run instead (L_c / L_t of its sequences). Methods differ in
the positions they train on (PoSE skips, RandPos, full length, none) and in the RoPE scaling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


@dataclass
class Settings:
    """One scale of the experiment (full or quick)."""

    model: str
    """Model preset of pose_megatron.presets (small, tiny)."""
    seq_length: int
    """L_c: the pretraining window, and the window PoSE extensions train at."""
    target_length: int
    """L_t: the length the extensions reach."""
    pretrain_iters: int
    """Steps of pretraining (one cosine schedule)."""
    pretrain_parts: int
    """Cached stages the pretraining is cut into (each resumes the previous one's checkpoint)."""
    pretrain_batch: int
    """Sequences of seq_length per pretraining step."""
    pretrain_lr: float
    """Peak learning rate of pretraining (cosine decay to a tenth)."""
    pretrain_warmup: int
    """Warm-up steps of pretraining."""
    extend_iters: int
    """Steps of every extension run."""
    extend_batch: int
    """Sequences per extension step, for every method (full-length at equal tokens: a share)."""
    extend_lr: float
    """Peak learning rate of the extensions (linear decay to 0)."""
    extend_warmup: int
    """Warm-up steps of the extensions."""
    synth_pretrain_docs: int
    """Synthetic retrieval documents (window-long) in the pretraining mixture."""
    synth_extend_docs: int
    """Synthetic retrieval documents (target-long) in the extension mixture."""
    eval_docs: int
    """Held-out corpus documents for perplexity."""
    ppl_lengths: List[int]
    """Perplexity window lengths."""
    ppl_stride: int
    """Perplexity sliding-window stride."""
    passkey_lengths: List[int]
    """Passkey prompt lengths."""
    passkey_trials: int
    """Passkey trials per length."""
    far_docs: int
    """Documents per data set of the far-token evaluation."""
    far_stride: int
    """Tokens each short window of the far-token evaluation scores."""
    methods: List[str]
    """Extension methods to run (names of ALL_METHODS)."""
    seeds: List[int]
    """Extension seeds of every method but the single-seed ones."""
    single_seed_methods: List[str] = field(default_factory=lambda: ["full-length"])
    """Methods run with the first seed only (full-length at equal sequences is the expensive row)."""
    fair_methods: List[str] = field(default_factory=list)
    """Linear-interpolation methods rerun once with fair_lr and fair_iters_factor x the steps."""
    fair_lr: float = 1e-4
    """Peak learning rate of the added setting."""
    fair_iters_factor: int = 2
    """The added setting trains this many times extend_iters."""
    eval_group_size: int = 7
    """Checkpoints per evaluation stage (each stage runs the three tools once over its group)."""
    passkey_new_tokens: int = 6
    """Greedy tokens per passkey answer: a space and five digits spell any key (keys are < 10^5)."""
    eval_interval: int = 200
    """Pretraining steps between validation passes."""
    eval_iters: int = 8
    """Batches of one pretraining validation pass."""
    pretrain_seed: int = 1234
    """Seed of pretraining (done once; every extension starts from it)."""
    nproc: int = 2
    """Processes of each training and evaluation run (gloo on CPU)."""

    @property
    def factor(self) -> int:
        return self.target_length // self.seq_length

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one extension step at L_c (what full-length at equal tokens also reads)."""
        return self.extend_batch * self.seq_length


@dataclass(frozen=True)
class Run:
    """One extension run: its method, seed, steps and learning rate."""

    method: str
    seed: int
    steps: int
    lr: float
    setting: str = "main"
    """"main" (the shared budget) or "fair" (the added setting for linear interpolation)."""

    @property
    def label(self) -> str:
        """Checkpoint directory and evaluation label, e.g. pose-ntk.s2 or pi-only.fair.s1."""
        middle = "" if self.setting == "main" else f".{self.setting}"
        return f"{self.method}{middle}.s{self.seed}"


def extension_runs(s: Settings) -> List[Run]:
    """Every extension run in order: each method over its seeds, then the added setting."""
    runs = []
    for method in s.methods:
        seeds = s.seeds[:1] if method in s.single_seed_methods else s.seeds
        runs += [Run(method, seed, s.extend_iters, s.extend_lr) for seed in seeds]
    runs += [Run(method, s.seeds[0], s.extend_iters * s.fair_iters_factor, s.fair_lr, "fair")
             for method in s.fair_methods]
    return runs


ALL_METHODS = ["pose-linear", "pose-ntk", "pose-yarn-revised", "full-length", "full-length-equal-tokens",
               "pi-only", "randpos"]
"""full-length trains the same sequences per step as the others (the paper's protocol);
full-length-equal-tokens trains as many tokens per step as a PoSE run."""

FULL = Settings(
    model="small", seq_length=128, target_length=1024,
    pretrain_iters=1200, pretrain_parts=2, pretrain_batch=16, pretrain_lr=1e-3, pretrain_warmup=30,
    extend_iters=60, extend_batch=16, extend_lr=3e-4, extend_warmup=8,
    synth_pretrain_docs=12000, synth_extend_docs=1500,
    eval_docs=12, ppl_lengths=[128, 256, 512, 1024], ppl_stride=64,
    passkey_lengths=[128, 256, 512, 1024], passkey_trials=16,
    far_docs=32, far_stride=32, methods=list(ALL_METHODS), seeds=[1, 2, 3],
    fair_methods=["pose-linear", "pi-only", "full-length-equal-tokens"],
)

QUICK = Settings(
    model="tiny", seq_length=128, target_length=512,
    pretrain_iters=6, pretrain_parts=1, pretrain_batch=4, pretrain_lr=1e-3, pretrain_warmup=1,
    extend_iters=3, extend_batch=8, extend_lr=3e-4, extend_warmup=1,
    synth_pretrain_docs=64, synth_extend_docs=32,
    eval_docs=2, ppl_lengths=[128, 256, 512], ppl_stride=64,
    passkey_lengths=[128, 512], passkey_trials=1,
    far_docs=2, far_stride=64, methods=["pose-yarn-revised", "full-length"], seeds=[1],
    eval_interval=3, eval_iters=1,
)


def method_flags(method: str, s: Settings) -> List[str]:
    """Training flags of one extension method (beyond the shared ones)."""
    lc, lt, factor = s.seq_length, s.target_length, str(s.factor)

    def batch(sequences: int) -> List[str]:
        if sequences < s.nproc or sequences % s.nproc:
            raise ValueError(f"{method} needs a global batch divisible by {s.nproc} processes, got {sequences}")
        return ["--micro-batch-size", str(sequences // s.nproc), "--global-batch-size", str(sequences)]

    pose = ["--seq-length", str(lc), "--pose-target-length", str(lt), "--pose-content", "skip"] + batch(s.extend_batch)
    if method == "pose-linear":
        return pose + ["--rope-type", "linear"]
    if method == "pose-ntk":
        return pose + ["--rope-type", "ntk"]
    if method == "pose-yarn-revised":
        return pose + ["--rope-type", "yarn-revised", "--rope-original-max-position-embeddings", str(lc)]
    if method == "randpos":
        return pose + ["--rope-type", "linear", "--pose-num-chunks", str(lc)]
    if method in ("full-length", "full-length-equal-tokens"):
        sequences = s.extend_batch if method == "full-length" else s.tokens_per_step // lt
        return ["--seq-length", str(lt), "--pose-target-length", str(lt), "--pose-content", "contiguous",
                "--pose-content-window", str(lt), "--rope-type", "linear", "--rope-factor", factor] + batch(sequences)
    if method == "pi-only":
        return ["--seq-length", str(lc), "--pose-target-length", str(lc), "--pose-content", "contiguous",
                "--pose-content-window", str(lc), "--rope-type", "linear", "--rope-factor", factor] + batch(s.extend_batch)
    raise ValueError(f"unknown method {method!r}; choose from {ALL_METHODS}")
