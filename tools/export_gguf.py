#!/usr/bin/env python3
"""Turn a Hugging Face export into a GGUF that llama.cpp runs with the trained RoPE.

    python tools/convert_megatron_to_hf.py --load runs/pose-128k --save models/pose-128k-hf \
        --tokenizer-dir models/llama-7b
    python tools/export_gguf.py --hf-dir models/pose-128k-hf --llama-cpp ~/src/llama.cpp \
        --outfile models/pose-128k-f16.gguf --outtype f16

Runs YOUR llama.cpp's converter (--llama-cpp: the checkout holding convert_hf_to_gguf.py, whose
requirements the --converter-python interpreter must have), then rewrites its GGUF with the `gguf`
package (`pip install -e .[export]`) to add what the converter drops: the per-frequency RoPE factor
tensors and the attention factor of PoSE's revised YaRN (and of YaRN with non-default betas or
attention factor), and Baichuan2's NormHead rows normalised. What llama.cpp cannot run is refused
first, with the reason (Baichuan: only default, ntk, linear and default YaRN, at 32 layers). Quantise
the result with llama-quantize as usual; it keeps the RoPE metadata. The logic lives in
pose_megatron.checkpoint.gguf_export; docs/llamacpp.md has the verification against llama.cpp.
"""

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    description = "Hugging Face export -> GGUF for llama.cpp (the converter, then the RoPE it drops)."
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="Hugging Face directory (config.json, weights, tokenizer)")
    parser.add_argument("--llama-cpp", required=True, help="llama.cpp checkout holding convert_hf_to_gguf.py")
    parser.add_argument("--outfile", required=True, help="GGUF file to write")
    parser.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0"], default="f16",
                        help="the converter's --outtype")
    parser.add_argument("--converter-python", default=sys.executable, help="Python running the converter")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --outfile")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pose_megatron.checkpoint.errors import run_conversion_tool
    from pose_megatron.checkpoint.gguf_export import export_gguf

    done = run_conversion_tool(lambda: export_gguf(
        args.hf_dir, args.outfile, args.llama_cpp, outtype=args.outtype, python=args.converter_python,
        overwrite=args.overwrite), args.log_level)
    if done is None:
        return 1
    (out, plan, changes), seconds = done
    rope = plan.info.rope_scaling
    print(f"wrote {out} in {seconds:.1f} s: {plan.arch}, rope {rope.rope_type} x{rope.factor:g}, "
          f"{len(changes)} change(s) to the converter's GGUF")
    for change in changes:
        print(f"  {change}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
