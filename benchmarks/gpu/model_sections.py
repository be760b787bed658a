"""Sections 1 and 2 of the GPU check: bf16 correctness against transformers, and step time.

1. correctness: PoseGPTModel (bf16) on per-sample PoSE positions against transformers'
   LlamaForCausalLM in bf16, both scored against the same LlamaForCausalLM in fp32. Goals: our
   max and mean logit error at most 1.5x transformers' own bf16 error; top-1 agreement with the
   fp32 reference >= 99%. Then the loss on contiguous positions against stock GPTModel (linear
   RoPE maps onto its seq_len_interpolation_factor, so both compute the same function).
2. step_time: forward + backward of PoseGPTModel with PoSE positions over stock GPTModel with
   contiguous positions (goal <= 1.03), same weights and layer spec (local, SDPA attention), at
   each micro-batch size; and the model FLOPs utilisation against the H200's spec peak (goal
   >= 35%), with the measured large-matmul ceiling beside it.
Each returns its JSON record; run_h200.py writes it.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics

import torch

import common
from sizes import H200_DENSE_BF16_TFLOPS, H200_MEASURED_MATMUL_TFLOPS, CheckSizes
from pose_megatron import runtime
from pose_megatron.rope import RopeScaling
from pose_megatron.train.progress import model_flops_per_token


def goal(value: float, op: str, target: float) -> dict:
    """One goal: the measured value, the goal as text, and whether it is met."""
    met = value <= target if op == "<=" else value >= target
    return {"value": float(value), "goal": f"{op} {target:g}", "met": bool(met)}


def start_megatron(seed: int = 0) -> None:
    """One process, TP = PP = 1 (the CPU layer is enabled by the child before any section)."""
    runtime.initialize_distributed()
    runtime.initialize_model_parallel(1, 1)
    runtime.set_seed(seed)


def _logit_errors(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    """Max and mean |logits - reference| over every entry, and top-1 agreement per position."""
    error = (logits.float() - reference).abs()
    agree = (logits.float().argmax(-1) == reference.argmax(-1)).float().mean()
    return {"max_error": error.max().item(), "mean_error": error.mean().item(),
            "top1_agreement": agree.item()}


@torch.no_grad()
def correctness(sizes: CheckSizes) -> dict:
    from tiny_models import copy_hf_into_pose, hf_llama

    start_megatron()
    torch.set_float32_matmul_precision("highest")  # the fp32 reference must not run in TF32
    cfg = sizes.correctness_model
    seq, target, batch = cfg.max_position_embeddings, sizes.correctness_target, sizes.correctness_batch
    scaling = RopeScaling("linear", factor=target / seq)
    device = runtime.get_device()

    hf = hf_llama(cfg, scaling, seed=0)
    hf.config._attn_implementation = "sdpa"
    hf = hf.to(device).eval()
    pose, stock = common.build_model_pair(cfg, scaling, seq, dtype=torch.bfloat16)
    copy_hf_into_pose(hf, pose, cfg)  # fp32 weights, cast to bf16 on load
    common.share_weights(pose, stock)
    pose.eval()
    stock.eval()

    tokens = common.random_tokens(batch, seq, cfg.vocab_size)  # [b, s]
    positions = common.pose_position_batch(batch, seq, target)  # [b, s], one skip per sample
    # PoSE positions jump, so transformers needs the explicit all-ones mask (docs/reference.md,
    # "Hugging Face transformers"); with it and SDPA it runs plain causal attention.
    hf_inputs = dict(input_ids=tokens, position_ids=positions, attention_mask=torch.ones_like(tokens))
    reference = hf(**hf_inputs).logits.float()  # [b, s, V] fp32
    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    theirs_logits = hf_bf16(**hf_inputs).logits  # [b, s, V] bf16
    del hf_bf16
    theirs = _logit_errors(theirs_logits, reference)
    ours_logits = pose(tokens, positions, None)[..., : cfg.vocab_size]  # [b, s, V] bf16
    ours = _logit_errors(ours_logits, reference)
    ours_vs_theirs = (ours_logits.argmax(-1) == theirs_logits.argmax(-1)).float().mean().item()
    del reference, ours_logits, theirs_logits

    labels = common.random_tokens(batch, seq, cfg.vocab_size, seed=1)
    contiguous = torch.arange(seq, device=device).expand(batch, seq)  # [b, s]
    loss_pose = pose(tokens, contiguous, None, labels=labels).float().mean().item()
    loss_stock = stock(tokens, contiguous, None, labels=labels).float().mean().item()
    loss_diff = abs(loss_pose - loss_stock) / abs(loss_stock)

    max_ratio = ours["max_error"] / theirs["max_error"]
    mean_ratio = ours["mean_error"] / theirs["mean_error"]
    runtime.destroy()
    return {
        "model": dataclasses.asdict(cfg) | {"seq": seq, "target": target, "batch": batch, "rope": "linear"},
        "ours_bf16": ours,
        "hf_bf16": theirs,
        "max_error_ratio": max_ratio,
        "mean_error_ratio": mean_ratio,
        "top1_agreement_ours_vs_hf_bf16": ours_vs_theirs,
        "contiguous_loss": {"pose": loss_pose, "stock": loss_stock, "relative_difference": loss_diff},
        "goals": {
            "max_error_ratio": goal(max_ratio, "<=", 1.5),
            "mean_error_ratio": goal(mean_ratio, "<=", 1.5),
            "top1_agreement": goal(ours["top1_agreement"], ">=", 0.99),
            "contiguous_loss_relative_difference": goal(loss_diff, "<=", 1e-3),
        },
        "note": ("errors are |logits - fp32 transformers logits| over all b x s x V entries; "
                 "top-1 agreement is against the fp32 reference's argmax (hf_bf16.top1_agreement "
                 "is what transformers' own bf16 reaches on the same random weights)"),
    }


def weight_matrix_params(model) -> int:
    """Parameters that take part in matmuls: all but the input embedding (a lookup, no FLOPs)."""
    embedding = model.embedding.word_embeddings.weight.numel()
    return sum(p.numel() for p in model.parameters()) - embedding


def step_time(sizes: CheckSizes) -> dict:
    start_megatron()
    cfg, seq, target = sizes.step_model, sizes.step_seq, sizes.step_target
    scaling = RopeScaling("yarn-revised", factor=target / seq, original_max_position_embeddings=seq)
    dtype = runtime.dtype_from_name(sizes.dtype)
    pose, stock = common.build_model_pair(cfg, scaling, seq, dtype=dtype)
    flops_per_token = model_flops_per_token(weight_matrix_params(pose), cfg.num_layers,
                                            cfg.hidden_size, seq)
    results, goals = {}, {}
    for batch in sizes.step_batches:
        tokens = common.random_tokens(batch, seq, cfg.vocab_size)
        labels = common.random_tokens(batch, seq, cfg.vocab_size, seed=1)
        runs = {
            "pose": (pose, common.pose_position_batch(batch, seq, target)),
            "stock": (stock, torch.arange(seq, device=tokens.device).expand(batch, seq)),
        }
        times = common.interleaved_step_times(runs, tokens, labels, sizes.step_repeats, sizes.step_warmup)
        pose_s, stock_s = statistics.median(times["pose"]), statistics.median(times["stock"])
        tflops = flops_per_token * batch * seq / pose_s / 1e12
        results[f"micro_batch_{batch}"] = {
            "pose_ms": pose_s * 1e3, "stock_ms": stock_s * 1e3, "ratio": pose_s / stock_s,
            "tokens_per_s": batch * seq / pose_s, "model_tflops": tflops,
            "mfu_spec_peak": tflops / H200_DENSE_BF16_TFLOPS,
            "mfu_measured_matmul_peak": tflops / H200_MEASURED_MATMUL_TFLOPS,
        }
        goals[f"ratio_micro_batch_{batch}"] = goal(pose_s / stock_s, "<=", 1.03)
        goals[f"mfu_micro_batch_{batch}"] = goal(tflops / H200_DENSE_BF16_TFLOPS, ">=", 0.35)
    runtime.destroy()
    return {
        "model": dataclasses.asdict(cfg) | {"seq": seq, "target": target, "rope": "yarn-revised",
                              "weight_matrix_params": weight_matrix_params(pose)},
        "dtype": sizes.dtype,
        "warmup": sizes.step_warmup,
        "repeats": sizes.step_repeats,
        **results,
        "peak_tflops": {"spec_dense_bf16": H200_DENSE_BF16_TFLOPS,
                        "measured_large_matmul": H200_MEASURED_MATMUL_TFLOPS},
        "goals": goals,
        "note": ("median forward+backward (no optimizer step); model FLOPs per token = 6 x "
                 "weight-matrix parameters (all but the input embedding, a lookup) + 6 x layers x "
                 "hidden x seq (causal attention, the trainer's formula); MFU is against the spec "
                 "peak, with the measured matmul ceiling beside it"),
    }
