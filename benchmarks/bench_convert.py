"""Checkpoint conversion: wall time over a plain copy, and peak memory over checkpoint size.

Builds a synthetic LLaMA checkpoint of about 2 GB (bf16 safetensors shards with an index; random
weights written tensor by tensor, never the whole model in memory), then measures side by side:

- a plain copy of the same files (shutil.copytree), the yardstick;
- HF -> Megatron (`convert_hf_to_megatron`) and Megatron -> HF (`convert_megatron_to_hf`), each in a
  fresh process: wall time of the conversion call (after imports), and the peak RSS reached during
  the call above the RSS after imports (the kernel's high-water mark is reset after imports through
  /proc/self/clear_refs).

The converters fsync what they write (as megatron-core's own checkpoint writer does), so that a
checkpoint that looks complete is on disk; a plain copy leaves its data in the page cache. Each
phase therefore starts with the page cache flushed (`os.sync()`, not timed) and is timed until its
output is on disk (the copy is followed by a timed `os.sync()`); the ratio to the copy's page-cache
time (before its sync) is printed too. Goals: time / copy <= 3; peak RSS growth / checkpoint size
<= 0.35. Temporary files are removed.

    .venv/bin/python benchmarks/bench_convert.py [--layers 16] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, HEADS, FFN, VOCAB = 2048, 16, 5504, 32000


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def build_checkpoint(out: Path, layers: int) -> int:
    """A random bf16 LLaMA in HF layout, streamed to ~500 MB safetensors shards; returns its bytes."""
    import torch

    from pose_megatron.checkpoint.hf_io import TensorEntry, write_safetensors_shards

    out.mkdir(parents=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": FFN, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS, "vocab_size": VOCAB, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
        "tie_word_embeddings": False, "hidden_act": "silu",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.v_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN), p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
        })
    shapes.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    entries = [TensorEntry(n, torch.bfloat16, s) for n, s in shapes.items()]
    torch.manual_seed(0)

    def tensors():
        for e in entries:
            yield e.name, torch.empty(e.shape, dtype=torch.bfloat16).uniform_(-0.02, 0.02)

    write_safetensors_shards(out, entries, tensors(), max_shard_bytes=500 << 20)
    return sum(e.nbytes for e in entries)


def child(mode: str, src: str, dst: str) -> None:
    """Run one conversion in this (fresh) process and print its time and peak RSS growth."""
    from pose_megatron.checkpoint.hf_export import convert_megatron_to_hf
    from pose_megatron.checkpoint.hf_import import convert_hf_to_megatron

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    base = _status_kib("VmRSS")
    os.sync()  # start with no dirty pages of earlier phases
    start = time.perf_counter()
    if mode == "import":
        convert_hf_to_megatron(src, dst, tp=1, pp=1)
    else:
        convert_megatron_to_hf(src, dst)
    os.sync()  # a no-op for data the converter fsynced; kept for symmetry with the copy
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    print(json.dumps({"seconds": seconds, "rss_base_kib": base, "rss_peak_kib": peak}))


def run_child(mode: str, src: Path, dst: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(src), str(dst)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16, help="16 layers of hidden 2048: about 1.9 GB")
    parser.add_argument("--keep", help="build the temporary files under this directory")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    root = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.keep))
    try:
        hf = root / "hf"
        t0 = time.perf_counter()
        size = build_checkpoint(hf, args.layers)
        print(f"synthetic LLaMA: {args.layers} layers, hidden {HIDDEN}, bf16, {size / 1e9:.2f} GB of "
              f"weights in {dir_bytes(hf) / 1e9:.2f} GB of files (built in {time.perf_counter() - t0:.1f} s)")

        os.sync()
        start = time.perf_counter()
        shutil.copytree(hf, root / "copy")
        cached_s = time.perf_counter() - start
        os.sync()
        copy_s = time.perf_counter() - start
        shutil.rmtree(root / "copy")

        results = {"import": run_child("import", hf, root / "megatron")}
        results["export"] = run_child("export", root / "megatron", root / "hf_export")
        print(f"plain copy (shutil.copytree): {copy_s:.2f} s until on disk ({cached_s:.2f} s into the "
              "page cache)")
        for mode, r in results.items():
            growth = (r["rss_peak_kib"] - r["rss_base_kib"]) * 1024
            print(f"{mode}: {r['seconds']:.2f} s -> time / copy = {r['seconds'] / copy_s:.2f} (goal <= 3; "
                  f"{r['seconds'] / cached_s:.2f} against the page-cache copy); peak RSS growth "
                  f"{growth / 1e6:.0f} MB -> / checkpoint size = {growth / size:.3f} (goal <= 0.35)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
