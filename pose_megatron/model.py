"""PoseGPTModel: megatron-core's GPTModel with rotary embeddings taken from each sample's position ids.

Stock GPTModel builds RoPE from `arange(seq_len)` and ignores `position_ids`, which would erase
PoSE's skipped positions. PoseGPTModel overrides one method, `_preprocess`, to build the rotary tensor
from the batch's position ids (on every pipeline stage, since each stage applies RoPE in its own
layers). RoPE scaling (linear / NTK / YaRN / ...) lives in `rope.py`; its attention factor is applied
as a softmax-scale multiplier so the rotary tensor stays pure angles and fused kernels stay usable.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from pose_megatron.presets import ModelConfig
from pose_megatron.rope import PoseRotaryEmbedding, RopeScaling
from pose_megatron.runtime import transformer_engine_usable


class PoseSDPAttention(MegatronModule):
    """Core attention through torch's scaled_dot_product_attention.

    Replaces megatron-core's local DotProductAttention, which materialises the [b, np, s, s] score
    matrix; SDPA's flash / memory-efficient kernels keep memory linear in sequence length on CPU and
    on GPUs without Transformer Engine. Same constructor and forward signature as DotProductAttention.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs Transformer Engine's attention")
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query,  # [sq, b, np, hn]
        key,  # [sk, b, ng, hn]
        value,  # [sk, b, ng, hn]
        attention_mask,  # None, or [b, 1, sq, sk] bool with True = masked out (Megatron's convention)
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("PoseSDPAttention supports neither packed sequences nor attention bias")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        if k.size(1) != q.size(1):
            # Grouped-query attention: each key/value head serves a contiguous block of query heads.
            repeats = q.size(1) // k.size(1)
            k = k.repeat_interleave(repeats, dim=1)
            v = v.repeat_interleave(repeats, dim=1)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        sdpa_mask = None if attention_mask is None else ~attention_mask
        context = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=sdpa_mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=causal,
            scale=self.softmax_scale,
        )  # [b, np, sq, hn]
        b, heads, sq, hn = context.shape
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)  # [sq, b, hp]


class NormHeadColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
    """Baichuan2's NormHead: logits use the weight with each vocab row normalised to unit L2 norm.

    Row-wise, so every tensor-parallel shard (a block of vocab rows) normalises locally. Normalising
    in the forward (not once at load) keeps Baichuan2's training semantics: the stored weight is the
    raw one, exactly as Baichuan2 checkpoints hold it.
    """

    def forward(self, input_, weight=None, runtime_gather_output=None):
        weight = F.normalize(self.weight if weight is None else weight, dim=-1)
        return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)


def get_layer_spec(use_transformer_engine: Optional[bool] = None) -> ModuleSpec:
    """The LLaMA layer spec: Transformer Engine's when usable, else local modules with SDPA attention."""
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_usable()
    if use_transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        # No normalization argument: TE's spec takes it from TransformerConfig.normalization (RMSNorm).
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = PoseSDPAttention
    return spec


class PoseGPTModel(GPTModel):
    """GPTModel whose rotary embedding follows the batch's position ids, with RoPE scaling.

    Args beyond GPTModel's: `rope_scaling` (the RoPE scaling, see rope.py); `rotary_base` is theta.
    `position_embedding_type` is fixed: the stock rotary module is not built (this one replaces it).
    """

    def __init__(
        self,
        config: TransformerConfig,
        transformer_layer_spec: ModuleSpec,
        vocab_size: int,
        max_sequence_length: int,
        rope_scaling: RopeScaling,
        rotary_base: float = 10000.0,
        norm_head: bool = False,
        **kwargs,
    ):
        rotary = PoseRotaryEmbedding(config.kv_channels, rotary_base, rope_scaling)
        if rotary.attention_factor != 1.0:
            # cos and sin both scaled by f scale q.k by f^2: fold it into the softmax scale.
            base_scale = config.softmax_scale or 1.0 / math.sqrt(config.kv_channels)
            config = dataclasses.replace(
                config, softmax_scale=base_scale * rotary.attention_factor**2
            )
        super().__init__(
            config,
            transformer_layer_spec,
            vocab_size,
            max_sequence_length,
            position_embedding_type="none",
            **kwargs,
        )
        self.rotary_base = rotary_base
        self.rope_scaling = rope_scaling
        self.pose_rotary = rotary
        if norm_head and self.post_process:
            # Same parameters and init as the stock output layer; only the forward differs.
            self.output_layer.__class__ = NormHeadColumnParallelLinear

    def _preprocess(self, input_ids, position_ids, decoder_input=None, inference_context=None,
                    packed_seq_params=None, padding_mask=None):
        if position_ids is None:
            raise ValueError("PoseGPTModel needs position_ids [b, s] on every pipeline stage")
        if inference_context is not None or packed_seq_params is not None:
            raise ValueError("PoseGPTModel supports neither inference contexts nor packed sequences")
        output = super()._preprocess(
            input_ids, position_ids, decoder_input, inference_context, packed_seq_params,
            padding_mask,
        )
        freqs = self.pose_rotary(position_ids)  # [s, b, 1, d], or [s, 1, 1, d] if shared
        if self.config.apply_rope_fusion and freqs.size(1) != 1:
            raise ValueError(
                "samples of this micro-batch have different position ids, which Transformer "
                "Engine's fused RoPE cannot take: disable RoPE fusion or use micro-batch size 1"
            )
        return (output[0], freqs) + tuple(output[2:])


def build_model(
    model_cfg: ModelConfig,
    transformer_config: TransformerConfig,
    rope_scaling: RopeScaling,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    use_transformer_engine: Optional[bool] = None,
    max_sequence_length: Optional[int] = None,
) -> PoseGPTModel:
    """A PoseGPTModel for this rank's pipeline stage (on the current device)."""
    tp = transformer_config.tensor_model_parallel_size
    model = PoseGPTModel(
        config=transformer_config,
        transformer_layer_spec=get_layer_spec(use_transformer_engine),
        vocab_size=model_cfg.padded_vocab_size(tp),
        max_sequence_length=max_sequence_length or model_cfg.max_position_embeddings,
        rope_scaling=rope_scaling,
        rotary_base=model_cfg.rotary_base,
        norm_head=model_cfg.norm_head,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def build_transformer_config(
    model: ModelConfig,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: Optional[bool] = None,
    apply_rope_fusion: bool = False,
    recompute_activations: bool = False,
    init_method_std: float = 0.02,
) -> TransformerConfig:
    """megatron-core's TransformerConfig for a LLaMA-style model at the given parallel sizes.

    Fusions that need apex or CUDA kernels are off on CPU. `apply_rope_fusion` may be True only
    when every sample of a micro-batch shares its positions (Transformer Engine's fused RoPE kernel
    takes one position sequence per micro-batch).
    """
    model.check_parallel(tensor_model_parallel_size, pipeline_model_parallel_size)
    on_gpu = torch.cuda.is_available()
    if use_cpu_initialization is None:
        use_cpu_initialization = not on_gpu
    return TransformerConfig(
        # The architecture.
        num_layers=model.num_layers, hidden_size=model.hidden_size, kv_channels=model.head_dim,
        num_attention_heads=model.num_attention_heads, num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        # LLaMA: RMSNorm, SwiGLU, no biases, no dropout.
        normalization="RMSNorm", layernorm_epsilon=model.norm_epsilon, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False, hidden_dropout=0.0,
        attention_dropout=0.0,
        # Parallelism, dtypes and initialisation.
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size, pipeline_dtype=params_dtype,
        params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16, init_method_std=init_method_std,
        use_cpu_initialization=use_cpu_initialization, perform_initialization=True,
        # Fusions: CUDA kernels only.
        apply_rope_fusion=apply_rope_fusion, bias_activation_fusion=on_gpu, bias_dropout_fusion=on_gpu,
        # megatron's fused softmax kernels come with Transformer Engine / apex; the local spec's
        # SDPA attention does not use them. persist_layer_norm is apex's LayerNorm (not RMSNorm):
        # with it on, megatron's torch norm fallback refuses to build on a GPU without apex.
        masked_softmax_fusion=on_gpu and transformer_engine_usable(),
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        recompute_granularity="full" if recompute_activations else None,
        recompute_method="uniform" if recompute_activations else None,
        recompute_num_layers=1 if recompute_activations else None,
    )
