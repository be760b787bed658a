"""The scales of the small reproduction and the training flags of each extension method.

Every extension trains the same steps on the same tokens per step; methods differ in the positions
they train on (PoSE skips, RandPos, full length, none) and in the RoPE scaling.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    """Steps of the first pretraining stage."""
    pretrain_batch: int
    """Samples of seq_length per pretraining step."""
    pretrain_lr: float
    """Peak learning rate of pretraining (cosine decay to a tenth)."""
    pretrain_warmup: int
    """Warm-up steps of pretraining."""
    extend_iters: int
    """Steps of every extension run."""
    extend_batch: int
    """Samples of seq_length per extension step; full-length training keeps the tokens per step."""
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
    eval_interval: int = 50
    """Pretraining steps between validation passes."""
    eval_iters: int = 8
    """Batches of one pretraining validation pass."""
    seed: int = 1234
    """Seed of pretraining and of every extension."""
    nproc: int = 2
    """Processes of each training and evaluation run (gloo on CPU)."""
    pretrain_more_iters: int = 0
    """Steps of a second pretraining stage on the same mixture (fresh schedule); 0 skips it."""
    pretrain_more_lr: float = 5e-4
    """Peak learning rate of the second pretraining stage."""
    pretrain_more_seed: int = 99
    """Seed of the second pretraining stage (a different data order)."""

    @property
    def factor(self) -> int:
        return self.target_length // self.seq_length

    @property
    def tokens_per_step(self) -> int:
        return self.extend_batch * self.seq_length


ALL_METHODS = ["pose-linear", "pose-ntk", "pose-yarn-revised", "full-length", "pi-only", "randpos"]

FULL = Settings(
    model="small", seq_length=256, target_length=2048,
    pretrain_iters=500, pretrain_batch=16, pretrain_lr=1e-3, pretrain_warmup=30,
    extend_iters=120, extend_batch=16, extend_lr=3e-4, extend_warmup=10,
    synth_pretrain_docs=8000, synth_extend_docs=1500,
    eval_docs=24, ppl_lengths=[256, 512, 1024, 2048], ppl_stride=128,
    passkey_lengths=[256, 512, 1024, 2048], passkey_trials=20,
    far_docs=16, far_stride=64, methods=list(ALL_METHODS),
    # 500 steps learn the corpus but not yet to copy the key (passkey 0/20 at 256); 300 more
    # steps on the same mixture reach 30/30 at 256 (an induction-like jump).
    pretrain_more_iters=300,
)

QUICK = Settings(
    model="tiny", seq_length=128, target_length=512,
    pretrain_iters=6, pretrain_batch=4, pretrain_lr=1e-3, pretrain_warmup=1,
    extend_iters=3, extend_batch=8, extend_lr=3e-4, extend_warmup=1,
    synth_pretrain_docs=64, synth_extend_docs=32,
    eval_docs=2, ppl_lengths=[128, 256, 512], ppl_stride=64,
    passkey_lengths=[128, 512], passkey_trials=1,
    far_docs=2, far_stride=64, methods=["pose-yarn-revised", "full-length"],
    eval_interval=3, eval_iters=1,
)


def method_flags(method: str, s: Settings) -> List[str]:
    """Training flags of one extension method (beyond the shared ones)."""
    lc, lt, factor = s.seq_length, s.target_length, str(s.factor)
    pose = ["--seq-length", str(lc), "--pose-target-length", str(lt), "--pose-content", "skip",
            "--micro-batch-size", str(s.extend_batch // s.nproc), "--global-batch-size", str(s.extend_batch)]
    if method == "pose-linear":
        return pose + ["--rope-type", "linear"]
    if method == "pose-ntk":
        return pose + ["--rope-type", "ntk"]
    if method == "pose-yarn-revised":
        return pose + ["--rope-type", "yarn-revised", "--rope-original-max-position-embeddings", str(lc)]
    if method == "randpos":
        return pose + ["--rope-type", "linear", "--pose-num-chunks", str(lc)]
    if method == "full-length":
        batch = s.tokens_per_step // lt
        if batch < s.nproc or batch % s.nproc:
            raise ValueError(f"full-length needs a global batch divisible by {s.nproc}, got {batch}")
        return ["--seq-length", str(lt), "--pose-target-length", str(lt), "--pose-content", "contiguous",
                "--pose-content-window", str(lt), "--rope-type", "linear", "--rope-factor", factor,
                "--micro-batch-size", str(batch // s.nproc), "--global-batch-size", str(batch)]
    if method == "pi-only":
        return ["--seq-length", str(lc), "--pose-target-length", str(lc), "--pose-content", "contiguous",
                "--pose-content-window", str(lc), "--rope-type", "linear", "--rope-factor", factor,
                "--micro-batch-size", str(s.extend_batch // s.nproc), "--global-batch-size", str(s.extend_batch)]
    raise ValueError(f"unknown method {method!r}; choose from {ALL_METHODS}")
