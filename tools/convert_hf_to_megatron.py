#!/usr/bin/env python3
"""Convert a Hugging Face checkpoint of a registered family (LLaMA-1/2/3, Baichuan-7B, Baichuan2-7B) to a megatron-core
dist checkpoint that the trainer loads with --load / --finetune (no model flags repeated).

    python tools/convert_hf_to_megatron.py --hf-dir models/llama-2-7b --save ckpt/llama2-7b \
        --tp 2 --pp 2 --dtype bf16

writes ckpt/llama2-7b/release/ (torch_dist, with pose_config.json holding the architecture and RoPE
read from config.json) and latest_checkpointed_iteration.txt = "release". The checkpoint loads at
any TP / PP; --tp / --pp are validated against the model and fix the vocabulary padding, as Megatron
pads it. Reads model.safetensors[.index.json] or pytorch_model.bin[.index.json] (weights only),
one tensor at a time. The PoSE authors' released checkpoints import too (rope_scaling types linear,
vanilla_ntk, yarn = the revised YaRN). The logic lives in pose_megatron.checkpoint.hf_import.
"""

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Hugging Face LLaMA / Baichuan -> megatron-core dist checkpoint (SAVE/release).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--hf-dir", required=True,
                        help="Hugging Face model directory (config.json + weights)")
    parser.add_argument("--save", required=True, help="output directory (Megatron-LM layout: SAVE/release)")
    parser.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1,
                        help="tensor parallel size the checkpoint is meant for (vocabulary padding)")
    parser.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1,
                        help="pipeline parallel size to validate against the number of layers")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="dtype of the stored weights (default: the checkpoint's own)")
    parser.add_argument("--legacy-yarn", choices=["revised", "standard"], default="revised",
                        help='meaning of rope_scaling {"type": "yarn"}: PoSE releases (revised YaRN) '
                             "or Hugging Face YaRN")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing SAVE/release (kept until the new one is complete)")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pose_megatron.checkpoint.errors import run_conversion_tool
    from pose_megatron.checkpoint.hf_import import convert_hf_to_megatron
    from pose_megatron.checkpoint.layout import load_run_config

    done = run_conversion_tool(lambda: convert_hf_to_megatron(
        args.hf_dir, args.save, tp=args.tp, pp=args.pp, dtype=args.dtype, legacy_yarn=args.legacy_yarn,
        overwrite=args.overwrite),
        args.log_level)
    if done is None:
        return 1
    ckpt, seconds = done
    run = load_run_config(ckpt)
    model, rope = run.model, run.rope_scaling
    print(f"wrote {ckpt} in {seconds:.1f} s: {run.family}, {model.num_layers} layers, "
          f"hidden {model.hidden_size}, {model.num_attention_heads} heads / {model.num_query_groups} "
          f"query groups, vocab {model.vocab_size} (padded to {run.extra['padded_vocab_size']}), window "
          f"{model.max_position_embeddings}, rope {rope.rope_type} x{rope.factor:g}"
          + (f" (target {run.target_length})" if run.target_length else "")
          + (", NormHead" if model.norm_head else ""))
    print(f"  train with: --load {args.save} (or --finetune) --tensor-model-parallel-size {args.tp} "
          f"--pipeline-model-parallel-size {args.pp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
