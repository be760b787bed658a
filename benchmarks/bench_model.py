"""PoseGPTModel overheads, measured side by side in one run.

1. Step time: forward+backward of PoseGPTModel with per-sample PoSE positions over stock megatron-core
   GPTModel with contiguous positions, same layer spec and weights (goal <= 1.03).
2. Peak memory: forward+backward of one attention layer's core attention at seq 4096, torch SDPA
   (PoseSDPAttention) over megatron-core's local DotProductAttention, each in a fresh process, as
   the growth of the peak memory (the process's peak RSS on CPU, reset just before).

    python benchmarks/bench_model.py [--seq 1024] [--repeats 20]
"""

import argparse
import json
import statistics
import subprocess
import sys

import torch

from common import (build_model_pair, interleaved_step_times, peak_memory, pose_position_batch,
                    random_tokens, reset_peak_memory)
from pose_megatron import runtime
from pose_megatron._compat import enable_cpu_fallbacks
from pose_megatron.model import PoseSDPAttention, build_transformer_config
from pose_megatron.presets import ModelConfig
from pose_megatron.rope import RopeScaling

BENCH_MODEL = ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=8, num_query_groups=4,
                          ffn_hidden_size=688, vocab_size=4096, max_position_embeddings=1024)


def bench_step_time(seq, batch, repeats):
    enable_cpu_fallbacks()

    runtime.initialize_distributed()
    runtime.initialize_model_parallel(1, 1)
    runtime.set_seed(0)
    scaling = RopeScaling("yarn-revised", factor=8.0, original_max_position_embeddings=seq)
    pose, stock = build_model_pair(BENCH_MODEL, scaling, seq)
    tokens = random_tokens(batch, seq, BENCH_MODEL.vocab_size)
    labels = random_tokens(batch, seq, BENCH_MODEL.vocab_size, seed=1)
    runs = {"pose": (pose, pose_position_batch(batch, seq, 8 * seq)),
            "stock": (stock, torch.arange(seq).expand(batch, seq))}
    times = interleaved_step_times(runs, tokens, labels, repeats, warmup=2)
    runtime.destroy()
    return statistics.median(times["pose"]), statistics.median(times["stock"])


def measure_attention_memory(kind, seq):
    """Peak memory growth (bytes) of one core-attention forward+backward; run in a fresh process."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    enable_cpu_fallbacks()

    runtime.initialize_distributed()
    runtime.initialize_model_parallel(1, 1)
    runtime.set_seed(0)
    config = build_transformer_config(BENCH_MODEL)
    cls = PoseSDPAttention if kind == "sdpa" else DotProductAttention
    attn = cls(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    heads, groups, d = BENCH_MODEL.num_attention_heads, BENCH_MODEL.num_query_groups, BENCH_MODEL.head_dim
    q = torch.randn(seq, 1, heads, d, requires_grad=True)
    k = torch.randn(seq, 1, groups, d, requires_grad=True)
    v = torch.randn(seq, 1, groups, d, requires_grad=True)
    before = reset_peak_memory()
    attn(q, k, v, None).sum().backward()
    return peak_memory() - before


def attention_memory(kind, seq):
    out = subprocess.run([sys.executable, __file__, "--memory-of", kind, "--seq", str(seq)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["bytes"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--memory-seq", type=int, default=4096)
    parser.add_argument("--memory-of", choices=["sdpa", "local"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps({"bytes": measure_attention_memory(args.memory_of, args.seq)}))
        return

    pose_t, stock_t = bench_step_time(args.seq, args.batch, args.repeats)
    print(f"step time, seq {args.seq} batch {args.batch} (median of {args.repeats}):")
    print(f"  PoseGPTModel, per-sample PoSE positions: {pose_t * 1e3:8.1f} ms")
    print(f"  stock GPTModel, contiguous positions:    {stock_t * 1e3:8.1f} ms")
    print(f"  ratio PoseGPTModel / GPTModel = {pose_t / stock_t:.3f}   (goal <= 1.03)")
    sdpa = attention_memory("sdpa", args.memory_seq)
    local = attention_memory("local", args.memory_seq)
    print(f"core attention peak memory, seq {args.memory_seq}, fwd+bwd:")
    print(f"  SDPA {sdpa / 2**20:8.1f} MiB   local DotProductAttention {local / 2**20:8.1f} MiB")
    print(f"  ratio SDPA / local = {sdpa / local:.3f}")


if __name__ == "__main__":
    main()
