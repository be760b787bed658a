"""PoseGPTModel overheads, measured side by side in one run.

1. Step time: forward+backward of PoseGPTModel with per-sample PoSE positions over stock megatron-core
   GPTModel with contiguous positions, same layer spec and weights (goal <= 1.03).
2. Peak memory: forward+backward of one attention layer's core attention at seq 4096, torch SDPA
   (PoseSDPAttention) over megatron-core's local DotProductAttention, each in a fresh process, as
   the growth of the process's peak RSS (Linux: the peak mark is reset just before).

    python benchmarks/bench_model.py [--seq 1024] [--repeats 20]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from pose_megatron import runtime
from pose_megatron._compat import enable_cpu_fallbacks
from pose_megatron.model import build_transformer_config
from pose_megatron.presets import ModelConfig
from pose_megatron.model import PoseSDPAttention, build_model, get_layer_spec
from pose_megatron.rope import RopeScaling

BENCH_MODEL = ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=8, num_query_groups=4,
                          ffn_hidden_size=688, vocab_size=4096, max_position_embeddings=1024)


def pose_positions(batch, seq, target, g):
    pos = torch.arange(seq).repeat(batch, 1)
    for row in pos:
        cut = int(torch.randint(1, seq // 2 + 1, (1,), generator=g))
        row[cut:] += int(torch.randint(0, target - seq + 1, (1,), generator=g))
    return pos


def time_step(model, tokens, positions, labels):
    start = time.perf_counter()
    loss = model(tokens, positions, None, labels=labels).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def bench_step_time(seq, batch, repeats):
    from megatron.core.models.gpt import GPTModel

    enable_cpu_fallbacks()

    runtime.initialize_distributed()
    runtime.initialize_model_parallel(1, 1)
    runtime.set_seed(0)
    scaling = RopeScaling("yarn-revised", factor=8.0, original_max_position_embeddings=seq)
    config = build_transformer_config(BENCH_MODEL)
    pose = build_model(BENCH_MODEL, config, scaling)
    stock = GPTModel(config, get_layer_spec(False), vocab_size=BENCH_MODEL.padded_vocab_size(),
                     max_sequence_length=seq, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False)
    stock.load_state_dict(pose.state_dict(), strict=False)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, BENCH_MODEL.vocab_size, (batch, seq), generator=g)
    labels = torch.randint(0, BENCH_MODEL.vocab_size, (batch, seq), generator=g)
    contiguous = torch.arange(seq).expand(batch, seq)
    pose_times, stock_times = [], []
    for i in range(repeats + 2):  # interleaved, so machine noise hits both alike; 2 warm-ups
        positions = pose_positions(batch, seq, 8 * seq, g)
        t_pose = time_step(pose, tokens, positions, labels)
        t_stock = time_step(stock, tokens, contiguous, labels)
        if i >= 2:
            pose_times.append(t_pose)
            stock_times.append(t_stock)
    runtime.destroy()
    return statistics.median(pose_times), statistics.median(stock_times)


def measure_attention_memory(kind, seq):
    """Peak RSS growth (bytes) of one core-attention forward+backward; run in a fresh process."""
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
    before = reset_peak_rss()
    attn(q, k, v, None).sum().backward()
    return peak_rss() - before


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss():
    """Reset the kernel's peak-RSS mark (Linux) and return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def peak_rss():
    return _status_kib("VmHWM") * 1024


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
