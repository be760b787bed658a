"""Evaluation backend for pose_megatron checkpoints, at any tensor / pipeline / data parallel size.

The checkpoint rebuilds itself: its `pose_config.json` (RunConfig) gives the architecture and the RoPE
scaling, so `--load DIR` needs no model flags. Forwards go through megatron-core's pipeline schedule
(forward only), so PP works like in training; every stage receives the position ids of the window
(contiguous 0..n-1 at evaluation).

Scoring never materialises the logits of a whole long window: the model runs with its output layer
detached (it returns the final hidden states), and the real output layer plus megatron-core's
vocab-parallel cross entropy run over chunks of the scored positions only. With a stride the later
windows score only their last `stride` positions, so most of the head's work disappears as well.
Padding rows of the vocabulary (added for TP divisibility) are excluded from the softmax: the model
is scored over its real vocabulary, as its Hugging Face export is. Registered as the "megatron"
backend (`--load`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.utils import VocabUtility

from pose_megatron import runtime
from pose_megatron.checkpoint.layout import load_run_config, resolve_checkpoint_dir
from pose_megatron.checkpoint.megatron_io import load_model_weights
from pose_megatron.evaluation.backend import (BackendOptions, EvalBackend, ScoreRequest, chunk_rows,
                                              logit_budget_elements, register_backend)
from pose_megatron.model import build_model, build_transformer_config


class _HiddenStatesHead(torch.nn.Module):
    """Stands in for the output layer: GPTModel then returns the final hidden states [b, s, h]."""

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        return hidden_states, None


class MegatronBackend(EvalBackend):
    """A pose_megatron checkpoint (`--load`: a save root or an iter_* directory)."""

    kind = "megatron"

    def __init__(
        self,
        load: str,
        label: str,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        dtype: str = "auto",
        seed: int = 1234,
    ):
        super().__init__(label, str(load))
        ckpt = resolve_checkpoint_dir(load)
        run_config = load_run_config(ckpt)
        if run_config is None:
            raise FileNotFoundError(
                f"{ckpt} has no pose_config.json, so the model cannot be rebuilt from it; "
                "evaluate checkpoints written by pose_megatron (training or the HF converter)"
            )
        self.run_config = run_config
        cfg = run_config.model
        tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
        cfg.check_parallel(tp, pp)

        runtime.initialize_distributed()
        if not (
            ps.model_parallel_is_initialized()
            and ps.get_tensor_model_parallel_world_size() == tp
            and ps.get_pipeline_model_parallel_world_size() == pp
        ):
            runtime.initialize_model_parallel(tp, pp)
        if not tensor_parallel.get_cuda_rng_tracker().get_states():
            runtime.set_seed(seed)

        params_dtype = runtime.dtype_from_name(dtype)
        tconfig = build_transformer_config(
            cfg,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            params_dtype=params_dtype,
        )
        # The weights come from the checkpoint: skip random initialisation (minutes for 7B on CPU).
        tconfig = dataclasses.replace(tconfig, perform_initialization=False)
        self.model = build_model(
            cfg,
            tconfig,
            run_config.rope_scaling,
            pre_process=ps.is_pipeline_first_stage(),
            post_process=ps.is_pipeline_last_stage(),
        )
        load_model_weights(ckpt, self.model)
        self.model.eval()

        self.checkpoint_dir = str(ckpt)
        self.max_positions = run_config.max_positions
        self.vocab_size = cfg.vocab_size
        self.device = runtime.get_device()
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.is_last_stage = ps.is_pipeline_last_stage()
        self.is_result_rank = self.is_last_stage and ps.get_tensor_model_parallel_rank() == 0
        self.is_main = runtime.is_first_rank()
        self.pipeline_size = pp
        # Several windows per schedule call keep all pipeline stages busy at once.
        self.group_size = 1 if pp == 1 else 2 * pp
        self._pad_mask = self._padded_vocab_mask() if self.is_last_stage else None

    def describe(self) -> dict:
        info = super().describe()
        info.update(
            checkpoint=self.checkpoint_dir,
            rope_scaling=dataclasses.asdict(self.run_config.rope_scaling),
            seq_length=self.run_config.seq_length,
            target_length=self.run_config.target_length,
            tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
            pipeline_model_parallel_size=self.pipeline_size,
            data_parallel_size=self.dp_size,
        )
        return info

    def close(self) -> None:
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- model pieces --------------------------------------------------------------------------
    def _padded_vocab_mask(self) -> Optional[torch.Tensor]:
        """[V/tp] True where this rank's output rows are vocabulary padding; None if none are."""
        local = self.model.output_layer.weight.shape[0]
        first, last = VocabUtility.vocab_range_from_per_partition_vocab_size(
            local, ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        )
        ids = torch.arange(first, last, device=self.model.output_layer.weight.device)
        mask = ids >= self.vocab_size
        return mask if bool(mask.any()) else None

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """[c, b, h] -> fp32 logits [c, b, V/tp] of this rank's vocabulary shard, padding at -inf."""
        logits, _ = self._output_layer(hidden, runtime_gather_output=False)
        logits = logits.float()  # a copy only when the model computes in bf16 / fp16
        if self._pad_mask is not None:
            # In place: the tensor is this call's own (the matmul output or its fp32 copy).
            logits.masked_fill_(self._pad_mask, float("-inf"))
        return logits

    @contextlib.contextmanager
    def _output_layer_detached(self):
        """Within: the model returns final hidden states [b, s, h]; self._output_layer is the head."""
        if not self.is_last_stage:
            yield
            return
        self._output_layer = self.model.output_layer
        self.model.output_layer = _HiddenStatesHead()
        try:
            yield
        finally:
            self.model.output_layer = self._output_layer

    def _run(self, requests: Sequence[ScoreRequest], on_hidden) -> list:
        """Forward each request through the pipeline schedule; the last stage returns
        on_hidden(request, hidden [1, n, h]) per request (an empty list on other stages)."""
        seq_length = len(requests[0].input_ids)
        device = self.device

        def batches() -> Iterator[dict]:
            positions = torch.arange(seq_length, device=device).unsqueeze(0)  # [1, n]
            for request in requests:
                tokens = torch.as_tensor(request.input_ids, device=device).unsqueeze(0)  # [1, n]
                yield {"tokens": tokens, "position_ids": positions, "request": request}

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            hidden = model(batch["tokens"], batch["position_ids"], None)

            def collect(output, non_loss_data=True):
                return on_hidden(batch["request"], output)

            return hidden, collect

        with self._output_layer_detached():
            return get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=batches(),
                model=[self.model],
                num_microbatches=len(requests),
                seq_length=seq_length,
                micro_batch_size=1,
                forward_only=True,
                collect_non_loss_data=True,
            )

    # ---- backend API ---------------------------------------------------------------------------
    def _nll(self, request: ScoreRequest, hidden: torch.Tensor) -> torch.Tensor:
        """Cross entropy of the scored targets, over sequence chunks of the output layer."""
        scored = hidden[0, request.first_target :].unsqueeze(1)  # [m, 1, h]
        labels = torch.as_tensor(request.targets[request.first_target :], device=hidden.device)
        rows = chunk_rows(len(labels), self._output_layer.weight.shape[0],
                          logit_budget_elements(hidden.device))
        losses = []
        split_vocab = ps.get_tensor_model_parallel_world_size() > 1
        for start in range(0, len(labels), rows):
            logits = self._head(scored[start : start + rows])  # [c, 1, V/tp]
            target = labels[start : start + rows]  # [c]
            if split_vocab:
                losses.append(tensor_parallel.vocab_parallel_cross_entropy(logits, target[:, None])[:, 0])
            else:  # the same maths; torch's fused log-softmax is about 2x faster on CPU
                losses.append(F.cross_entropy(logits[:, 0], target, reduction="none"))
        return torch.cat(losses).double().cpu()

    def _score(self, requests: Sequence[ScoreRequest]) -> List[Optional[torch.Tensor]]:
        results = []
        for start in range(0, len(requests), self.group_size):
            group = requests[start : start + self.group_size]
            out = self._run(group, self._nll)
            results.extend(out if self.is_result_rank else [None] * len(group))
        return results

    def _argmax_last(self, request: ScoreRequest, hidden: torch.Tensor) -> int:
        """Greedy next token from the last position: each rank's best in its vocabulary shard,
        then the best over shards (ties go to the lowest id, as argmax over the full row would)."""
        logits = self._head(hidden[:, -1:].transpose(0, 1).contiguous())[0, 0]  # [V/tp]
        value, index = logits.max(dim=-1)
        first = ps.get_tensor_model_parallel_rank() * logits.shape[0]
        best = torch.stack([value.double(), (index + first).double()])  # [2]
        tp = ps.get_tensor_model_parallel_world_size()
        if tp == 1:
            return int(best[1])
        shards = [torch.empty_like(best) for _ in range(tp)]
        dist.all_gather(shards, best, group=ps.get_tensor_model_parallel_group())
        winner = shards[0]
        for shard in shards[1:]:  # in vocabulary order; strictly greater keeps the lowest id
            if shard[0] > winner[0]:
                winner = shard
        return int(winner[1])

    def _next_token(self, ids: List[int]) -> int:
        # Targets are unused: only the last position's logits matter.
        request = ScoreRequest(input_ids=np.asarray(ids, dtype=np.int64), targets=np.zeros(len(ids), np.int64))
        out = self._run([request], self._argmax_last)
        token = torch.zeros(1, dtype=torch.long, device=self.device)
        if self.is_last_stage:
            token[0] = out[0]
        if self.pipeline_size > 1:
            # The last stage decided; the first stage needs the token for the next forward.
            dist.broadcast(
                token,
                src=ps.get_pipeline_model_parallel_last_rank(),
                group=ps.get_pipeline_model_parallel_group(),
            )
        return int(token.item())


@register_backend("megatron")
def open_megatron_backend(path: str, label: str, options: BackendOptions) -> MegatronBackend:
    return MegatronBackend(
        path,
        label=label,
        tensor_model_parallel_size=options.tensor_model_parallel_size,
        pipeline_model_parallel_size=options.pipeline_model_parallel_size,
        dtype=options.dtype,
    )
