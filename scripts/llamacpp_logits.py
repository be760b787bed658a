#!/usr/bin/env python3
"""Logits of GGUF models as a real llama.cpp computes them, for scripts/verify_llamacpp.py.

Runs under any interpreter that has llama-cpp-python and numpy (it imports nothing from
pose_megatron, so it can live in another virtual environment):

    python scripts/llamacpp_logits.py JOBS.json

JOBS.json holds {"tokens": [ids], "n_ctx": N, "threads": T, "jobs": [{"gguf": path, "out": path.npy}]}.
Each model evaluates the token ids in one batch at positions 0..n-1 and saves float32 logits
[n, vocab] to its "out"; a model llama.cpp refuses to load is reported instead. The KV cache is float32 (llama.cpp's default is float16, whose rounding
would hide differences of the size the check looks for). Prints the llama-cpp-python version.
"""

import json
import sys

import numpy as np


def logits(gguf_path: str, tokens, n_ctx: int, threads: int) -> np.ndarray:
    from llama_cpp import GGML_TYPE_F32, Llama

    model = Llama(model_path=gguf_path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                  logits_all=True, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)
    model.eval(tokens)
    scores = np.array(model.scores[: len(tokens)], dtype=np.float32)  # [n, vocab]
    model.close()
    return scores


def main(argv) -> int:
    import llama_cpp

    with open(argv[1]) as f:
        spec = json.load(f)
    failures = {}
    for job in spec["jobs"]:
        try:
            np.save(job["out"], logits(job["gguf"], spec["tokens"], spec["n_ctx"], spec["threads"]))
        except ValueError as error:  # llama-cpp-python: the model failed to load (e.g. a tensor its
            failures[job["out"]] = str(error)  # architecture does not take); the caller reports it
    print(json.dumps({"llama_cpp_python": llama_cpp.__version__, "failures": failures}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
