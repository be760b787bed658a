"""Evaluation backend for a Hugging Face model directory (transformers AutoModelForCausalLM).

Every forward passes an explicit all-ones attention mask and explicit position ids. Without the
mask transformers 5 infers packed sequences from position ids (docs/reference.md, "Hugging Face
transformers"); with it, and
SDPA attention, transformers hands SDPA `is_causal=True` and builds no [s, s] mask.

Scoring runs the decoder for the final hidden states and applies the LM head to chunks of the scored
positions, so a 128k window never holds [s, vocab] logits at once. That split is exact only for
models whose logits are `lm_head(hidden)` with nothing after it; other model types score through
the full forward with `logits_to_keep` (logits of the scored positions only).
Under torchrun every rank holds a replica and takes its share of windows and trials. Registered as
the "hf" backend (`--hf-dir`).
"""

from __future__ import annotations

import inspect
import os
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pose_megatron.evaluation.backend import (BackendOptions, EvalBackend, ScoreRequest, chunk_rows,
                                              logit_budget_elements, register_backend)
from pose_megatron.runtime import dtype_from_name

PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
"""model_type values whose logits are exactly lm_head(final hidden states)."""


class HFBackend(EvalBackend):
    """A local Hugging Face checkpoint directory (`--hf-dir`)."""

    kind = "hf"

    def __init__(self, hf_dir: str, label: str, dtype: str = "auto", attn_implementation: str = "sdpa"):
        super().__init__(label, str(hf_dir))
        from transformers import AutoModelForCausalLM

        if not os.path.isfile(os.path.join(hf_dir, "config.json")):
            raise FileNotFoundError(f"{hf_dir} is no Hugging Face model directory (no config.json)")
        if dist.is_initialized():
            self.dp_rank, self.dp_size = dist.get_rank(), dist.get_world_size()
            self.is_main = self.dp_rank == 0
        if torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.model = AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=dtype_from_name(dtype), attn_implementation=attn_implementation
        ).to(self.device)
        self.model.eval()
        config = self.model.config
        self.max_positions = getattr(config, "max_position_embeddings", None)
        self.vocab_size = config.vocab_size
        self.chunked_head = getattr(config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES
        # transformers renamed past_key_values to cache (both in and out) during 5.x.
        forward_args = inspect.signature(self.model.forward).parameters
        self._cache_name = "cache" if "cache" in forward_args else "past_key_values"

    def describe(self) -> dict:
        info = super().describe()
        info.update(model_type=getattr(self.model.config, "model_type", None),
                    rope_parameters=getattr(self.model.config, "rope_parameters", None))
        return info

    def close(self) -> None:
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _inputs(self, ids: torch.Tensor, offset: int = 0) -> dict:
        """input_ids [1, n] at positions offset..offset+n-1, with the all-ones mask over the cache."""
        n = ids.shape[1]
        return {
            "input_ids": ids,
            "position_ids": torch.arange(offset, offset + n, device=self.device).unsqueeze(0),
            "attention_mask": torch.ones(1, offset + n, dtype=torch.long, device=self.device),
        }

    def _nll(self, request: ScoreRequest) -> torch.Tensor:
        ids = torch.as_tensor(request.input_ids, device=self.device).unsqueeze(0)  # [1, n]
        labels = torch.as_tensor(request.targets[request.first_target :], device=self.device)
        if not self.chunked_head:
            keep = torch.arange(request.first_target, ids.shape[1], device=self.device)
            logits = self.model(**self._inputs(ids), use_cache=False, logits_to_keep=keep).logits
            return F.cross_entropy(logits[0].float(), labels, reduction="none").double().cpu()
        hidden = self.model.base_model(**self._inputs(ids), use_cache=False).last_hidden_state
        scored = hidden[0, request.first_target :]  # [m, h]
        head = self.model.get_output_embeddings()
        rows = chunk_rows(len(labels), head.weight.shape[0], logit_budget_elements(self.device))
        losses = [
            F.cross_entropy(head(scored[s : s + rows]).float(), labels[s : s + rows], reduction="none")
            for s in range(0, len(labels), rows)
        ]
        return torch.cat(losses).double().cpu()

    def _score(self, requests: Sequence[ScoreRequest]) -> List[Optional[torch.Tensor]]:
        return [self._nll(r) for r in requests]

    def greedy_generate(self, prompt: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> List[int]:
        """Greedy decoding with the key/value cache (one prompt forward, then one token per step)."""
        if max_new_tokens < 1:
            return []
        with torch.no_grad():
            ids = torch.as_tensor(list(prompt), device=self.device).unsqueeze(0)  # [1, n]
            out = self.model(**self._inputs(ids), use_cache=True, logits_to_keep=1)
            generated: List[int] = []
            offset = ids.shape[1]
            while True:
                token = int(out.logits[0, -1].argmax())
                generated.append(token)
                if token in stop_ids or len(generated) == max_new_tokens:
                    return generated
                step = torch.tensor([[token]], device=self.device)
                cache = {self._cache_name: getattr(out, self._cache_name)}
                out = self.model(**self._inputs(step, offset), **cache, use_cache=True, logits_to_keep=1)
                offset += 1


@register_backend("hf")
def open_hf_backend(path: str, label: str, options: BackendOptions) -> HFBackend:
    """The model whole on every rank: the parallel sizes of the options apply to Megatron
    checkpoints only (under torchrun each rank here is one data-parallel replica)."""
    return HFBackend(path, label=label, dtype=options.dtype)
