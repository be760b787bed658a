#!/usr/bin/env python3
"""Export a pose_megatron checkpoint (any TP / PP) to a Hugging Face model directory.

    python tools/convert_megatron_to_hf.py --load runs/pose-16k --save models/llama2-7b-pose-16k \
        --tokenizer-dir models/llama-2-7b

--load is a save root (its latest iteration) or an iter_* / release directory. Writes safetensors
shards with their index, config.json with max_position_embeddings = the PoSE target length and the
RoPE scaling for stock transformers (linear, yarn, llama3 natively; NTK as a larger rope_theta;
PoSE's revised YaRN as longrope), and the tokenizer files with model_max_length updated. LLaMA
exports load with AutoModelForCausalLM and no remote code; Baichuan exports use Baichuan's own
layout (W_pack) and config (its modeling files come along from --tokenizer-dir). Only the model's
tensors are read, one layer at a time. The logic lives in pose_megatron.checkpoint.hf_export.
"""

import argparse
import json
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="pose_megatron dist checkpoint -> Hugging Face directory (safetensors + config.json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--load", required=True, help="checkpoint: a --save root or an iteration directory")
    parser.add_argument("--save", required=True, help="new (or empty) Hugging Face output directory")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="directory whose tokenizer (and remote-code) files are copied")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="dtype of the exported weights (default: as stored)")
    parser.add_argument("--max-shard-size-gb", type=float, default=5.0, help="safetensors shard size")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pose_megatron.checkpoint.errors import run_conversion_tool
    from pose_megatron.checkpoint.hf_export import convert_megatron_to_hf

    done = run_conversion_tool(lambda: convert_megatron_to_hf(
        args.load, args.save, args.tokenizer_dir, dtype=args.dtype,
        max_shard_bytes=int(args.max_shard_size_gb * (1 << 30))), args.log_level)
    if done is None:
        return 1
    out, seconds = done
    config = json.loads((out / "config.json").read_text())
    rope = config["rope_parameters"]
    print(f"wrote {out} in {seconds:.1f} s: {config['architectures'][0]}, "
          f"max_position_embeddings {config['max_position_embeddings']}, rope_type {rope['rope_type']} "
          f"(rope_theta {rope['rope_theta']:g}), {config['torch_dtype']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
