"""What the evaluations need from a model: score a window's tokens, and greedy-generate.

This module is the interface only; it imports no implementation. Implementations register an opener
under a name with `register_backend` (megatron_backend.py: a pose_megatron checkpoint at any
TP / PP / DP; hf_backend.py: a Hugging Face directory through transformers), and `open_backend`
looks the name up. The built-in names map to their modules in BUILTIN_BACKEND_MODULES, imported on
first use, so opening a Hugging Face directory never imports the Megatron backend and the other way
round. The perplexity, passkey and far-token drivers only see `EvalBackend`.

Distributed contract. Windows and trials are split over data-parallel replicas (`dp_rank` of
`dp_size`); every rank of one replica makes the same calls in the same order (the model-parallel
collectives inside need that). Scores exist on a replica's "result rank" only (the last pipeline
stage, tensor rank 0) and are None elsewhere; `all_reduce_sum` and `gather_results` combine what
the result ranks hold, over all replicas, and every rank gets the total.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch


@dataclass
class ScoreRequest:
    """One window to score: the model reads `input_ids` at positions 0..n-1; position i predicts
    targets[i]; only targets[first_target:] are scored."""

    input_ids: np.ndarray
    """[n] token ids (BOS first)."""
    targets: np.ndarray
    """[n] the next token at each position."""
    first_target: int = 0
    """Targets before this index are context only."""

    def __post_init__(self):
        if len(self.input_ids) != len(self.targets) or len(self.input_ids) < 1:
            raise ValueError(
                f"a window needs as many targets as inputs (>= 1), got {len(self.input_ids)} "
                f"inputs and {len(self.targets)} targets"
            )
        if not 0 <= self.first_target < len(self.targets):
            raise ValueError(f"first_target {self.first_target} outside 0..{len(self.targets) - 1}")


class EvalBackend:
    """A model under evaluation. Subclasses implement `_score` and `_next_token`."""

    kind = ""

    def __init__(self, label: str, source: str):
        self.label = label
        """Name in tables, plots and JSON."""
        self.source = source
        """The checkpoint path."""
        self.max_positions: Optional[int] = None
        """Positions the model was trained or extended to; longer inputs extrapolate."""
        self.vocab_size: int = 0
        """Real vocabulary (padding rows of a Megatron output layer excluded)."""
        self.dp_rank, self.dp_size = 0, 1
        self.is_result_rank = True
        """This rank holds scores and generated tokens of its replica's requests."""
        self.is_main = True
        """This rank prints, writes files and shows the progress bar (global rank 0)."""
        self.group_size = 1
        """Windows worth scoring in one call (the pipeline schedule's micro-batches)."""
        self.device = torch.device("cpu")

    # ---- subclass surface ------------------------------------------------------------------
    # Both hooks are optional: a backend implements the ones its tasks call (perplexity and far
    # tokens score; passkey generates, through `_next_token` or its own `greedy_generate`).
    def _score(self, requests: Sequence[ScoreRequest]) -> List[Optional[torch.Tensor]]:
        raise NotImplementedError(f"the {self.kind} backend cannot score windows: it implements no _score")

    def _next_token(self, ids: List[int]) -> int:
        raise NotImplementedError(f"the {self.kind} backend cannot generate: it implements neither "
                                  "_next_token nor greedy_generate")

    def describe(self) -> dict:
        return {"kind": self.kind, "source": self.source, "max_positions": self.max_positions}

    def close(self) -> None:
        """Free the model (the next checkpoint may need the memory)."""

    # ---- public API ------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, requests: Sequence[ScoreRequest]) -> List[Optional[torch.Tensor]]:
        """Per-token negative log-likelihood (float64, CPU) of each request's scored targets.

        None on ranks that are not result ranks. Requests of one call must have the same length.
        """
        if len({len(r.input_ids) for r in requests}) > 1:
            raise ValueError("requests of one score() call must have the same length")
        return self._score(requests)

    @torch.no_grad()
    def greedy_generate(
        self, prompt: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()
    ) -> List[int]:
        """Greedy continuation of `prompt` (positions 0..n-1), at most `max_new_tokens` tokens,
        ending early after a token of `stop_ids`. Every rank of the replica returns the tokens."""
        ids = [int(t) for t in prompt]
        generated: List[int] = []
        for _ in range(max_new_tokens):
            token = self._next_token(ids)
            generated.append(token)
            ids.append(token)
            if token in stop_ids:
                break
        return generated

    def all_reduce_sum(self, values: Sequence[float]) -> List[float]:
        """Sum of `values` over the result ranks of all replicas (non-result ranks add nothing)."""
        local = [float(v) if self.is_result_rank else 0.0 for v in values]
        if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
            return local
        tensor = torch.tensor(local, dtype=torch.float64, device=self._comm_device())
        torch.distributed.all_reduce(tensor)
        return tensor.cpu().tolist()

    def gather_results(self, items: List[Any]) -> List[Any]:
        """The concatenated lists of all replicas' result ranks (in rank order)."""
        if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
            return list(items)
        gathered: List[Optional[List[Any]]] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, items if self.is_result_rank else [])
        return [item for part in gathered for item in (part or [])]

    def _comm_device(self) -> torch.device:
        backend = torch.distributed.get_backend()
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def chunk_rows(total: int, row_elements: int, budget_elements: int) -> int:
    """Rows per chunk so that one chunk of [rows, row_elements] stays within budget_elements."""
    return max(1, min(total, budget_elements // max(1, row_elements)))


GPU_LOGIT_BUDGET_ELEMENTS = 1 << 26
"""fp32 logits materialised at once when scoring on a GPU (256 MiB): the [s, vocab] logits of a
long window are computed in sequence chunks of this size, never as a whole; chunks this large keep
the output-layer matmul wide enough for the GPU."""

CPU_LOGIT_BUDGET_ELEMENTS = 1 << 22
"""The same on CPU (16 MiB). The log-softmax passes over each chunk are memory-bound: a chunk that
stays in the last-level cache and under glibc's largest mmap threshold (32 MiB, above which every
allocation is a fresh mapping paid in page faults) makes cross entropy 2-3x cheaper than a
256 MiB chunk (cProfile of benchmarks/bench_eval.py's 8k window), while the matmul costs the same
per row."""


def logit_budget_elements(device: torch.device) -> int:
    """How many fp32 logits a scoring chunk may hold on `device`."""
    return GPU_LOGIT_BUDGET_ELEMENTS if device.type == "cuda" else CPU_LOGIT_BUDGET_ELEMENTS


def default_label(path: str) -> str:
    """A readable label for a checkpoint path: its last directory name(s)."""
    parts = [p for p in str(path).rstrip("/").split("/") if p]
    if not parts:
        return str(path)
    if parts[-1].startswith("iter_") or parts[-1] == "release":
        return "/".join(parts[-2:])
    return parts[-1]


@dataclass
class BackendOptions:
    """How a checkpoint is opened; each backend reads the fields that apply to it."""

    dtype: str = "auto"
    """Compute dtype: auto (bf16 on a GPU, fp32 on CPU) or a name of pose_megatron.runtime.DTYPES."""
    tensor_model_parallel_size: int = 1
    """TP of a Megatron checkpoint. A Hugging Face model is not split: each rank holds a replica."""
    pipeline_model_parallel_size: int = 1
    """PP of a Megatron checkpoint (world size = TP x PP x DP)."""


BackendOpener = Callable[[str, str, BackendOptions], EvalBackend]
"""(checkpoint path, label, options) -> an open backend."""

BACKENDS: Dict[str, BackendOpener] = {}
"""Backend name (the `kind` of a checkpoint) -> its opener, filled by `register_backend`."""

BUILTIN_BACKEND_MODULES = {
    "megatron": "pose_megatron.evaluation.megatron_backend",
    "hf": "pose_megatron.evaluation.hf_backend",
}
"""Where the built-in backends register themselves: imported by `open_backend` on first use."""


def register_backend(name: str) -> Callable[[BackendOpener], BackendOpener]:
    """Decorator: `@register_backend("hf")` on an opener makes `open_backend("hf", ...)` call it."""

    def register(opener: BackendOpener) -> BackendOpener:
        if name in BACKENDS and BACKENDS[name] is not opener:
            raise ValueError(f"backend {name!r} is already registered by {BACKENDS[name].__module__}")
        BACKENDS[name] = opener
        return opener

    return register


def open_backend(kind: str, path: str, label: Optional[str] = None, **options) -> EvalBackend:
    """Open the checkpoint at `path` with the backend registered as `kind` ("megatron": a --load
    checkpoint, "hf": an --hf-dir directory). `options` are BackendOptions fields."""
    if kind not in BACKENDS and kind in BUILTIN_BACKEND_MODULES:
        importlib.import_module(BUILTIN_BACKEND_MODULES[kind])  # registers itself on import
    if kind not in BACKENDS:
        known = sorted(set(BACKENDS) | set(BUILTIN_BACKEND_MODULES))
        raise ValueError(f"unknown backend kind {kind!r}; use one of {known}")
    return BACKENDS[kind](str(path), label or default_label(path), BackendOptions(**options))
