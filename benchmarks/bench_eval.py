"""Perplexity tool throughput at a long window, against a plain transformers forward, in one run.

Both sides run the same weights (a small LLaMA with a LLaMA-sized vocabulary, random, linear RoPE
x8 so 8192 positions are in range) over the same documents of W - 1 tokens, one window each:
- tool: pose_megatron.evaluation's perplexity driver on the Megatron checkpoint (MegatronBackend:
  SDPA attention, logits and cross entropy over sequence chunks) and on the HF directory (HFBackend);
- reference: `LlamaForCausalLM(..., attn_implementation="sdpa")(ids, attention_mask=1, labels=ids)`,
  what a hand-written evaluation loop does (full [s, vocab] logits, then the loss).
Rounds alternate between the sides so machine noise hits both; each side's best round is reported
(the least disturbed one, as timeit does: other work on the machine only ever adds time).

    python benchmarks/bench_eval.py [--length 8192] [--rounds 5] [--vocab 32000] [--dtype auto]
    python benchmarks/bench_eval.py --layers 8 --hidden 2048 --heads 16 --groups 8 --ffn 5632  # GPU

Prints tokens/s of each and the ratio tool / transformers (goal >= 1.0).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import describe_device, synchronize
from pose_megatron import runtime
from pose_megatron._compat import enable_cpu_fallbacks
from pose_megatron.checkpoint.layout import RunConfig
from pose_megatron.checkpoint.megatron_io import save_model_weights
from pose_megatron.presets import ModelConfig
from pose_megatron.evaluation import open_backend
from pose_megatron.evaluation.perplexity import evaluate_length
from pose_megatron.rope import RopeScaling

BOS = 1
# The weight copy HF -> Megatron of the parity tests (tests/tiny_models.py) builds both sides.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def bench_model(args) -> ModelConfig:
    return ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                       num_query_groups=args.groups, ffn_hidden_size=args.ffn, vocab_size=args.vocab,
                       max_position_embeddings=1024)


def build_checkpoints(cfg: ModelConfig, scaling: RopeScaling, root: Path):
    """A random HF LLaMA saved to root/hf, and the same weights as a Megatron checkpoint."""
    from tiny_models import copy_hf_into_pose, hf_llama, pose_llama

    hf = hf_llama(cfg, scaling, seed=0)
    hf.save_pretrained(root / "hf")
    pose = pose_llama(cfg, scaling).eval()
    copy_hf_into_pose(hf, pose, cfg)
    save_model_weights(root / "megatron", 1, pose, RunConfig(model=cfg, rope_scaling=scaling,
                                                              target_length=8 * cfg.max_position_embeddings))
    del pose
    return hf


@torch.no_grad()
def time_transformers(hf, doc: np.ndarray) -> float:
    ids = torch.tensor([[BOS] + doc.tolist()], device=hf.device)
    synchronize()
    start = time.perf_counter()
    loss = hf(ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    synchronize()
    elapsed = time.perf_counter() - start
    assert torch.isfinite(loss)
    return elapsed


def measure_rates(cfg: ModelConfig, scaling: RopeScaling, length: int, rounds: int,
                  dtype_name: str) -> dict:
    """Tokens/s of each side (the best of `rounds` alternated rounds after a warm-up), and
    slowest/best per side. megatron-core must be initialised."""
    rng = np.random.default_rng(0)
    doc = rng.integers(3, cfg.vocab_size, size=length - 1)  # one full window: BOS + W - 1 tokens
    dtype = runtime.dtype_from_name(dtype_name)

    with tempfile.TemporaryDirectory() as tmp:
        hf = build_checkpoints(cfg, scaling, Path(tmp))
        hf.config._attn_implementation = "sdpa"  # the reference side: stock transformers, SDPA
        hf = hf.to(runtime.get_device(), dtype).eval()
        tools = {"megatron": open_backend("megatron", f"{tmp}/megatron", dtype=dtype_name),
                 "hf": open_backend("hf", f"{tmp}/hf", dtype=dtype_name)}
        seconds = {"transformers": [], **{k: [] for k in tools}}
        for name, backend in tools.items():  # warm-up at the measured shape (kernel choices, caches)
            evaluate_length(backend, [doc], length, bos=BOS, progress=False)
        time_transformers(hf, doc)
        for _ in range(rounds):
            for name, backend in tools.items():
                result = evaluate_length(backend, [doc], length, bos=BOS, progress=False)
                seconds[name].append(result.seconds)
            seconds["transformers"].append(time_transformers(hf, doc))
        for backend in tools.values():
            backend.close()

    scored = len(doc)
    return {
        "tokens_per_s": {name: scored / min(s) for name, s in seconds.items()},
        "spread": {name: round(max(s) / min(s), 2) for name, s in seconds.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=688)
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                        help="all three sides (auto: bf16 on GPU, fp32 on CPU)")
    args = parser.parse_args()

    enable_cpu_fallbacks()

    runtime.initialize_distributed()
    runtime.initialize_model_parallel(1, 1)
    runtime.set_seed(0)
    cfg = bench_model(args)
    measured = measure_rates(cfg, RopeScaling("linear", factor=8.0), args.length, args.rounds, args.dtype)
    rate, spread = measured["tokens_per_s"], measured["spread"]
    dtype = runtime.dtype_from_name(args.dtype)
    print(f"perplexity at window {args.length}, model {cfg.num_layers}x{cfg.hidden_size}, "
          f"vocab {args.vocab}, {dtype}, {describe_device()}, best of {args.rounds} rounds "
          f"(slowest/best per side: {spread})")
    print(f"  transformers forward (sdpa, labels=ids): {rate['transformers']:10.0f} tok/s")
    print(f"  tool, Megatron checkpoint:               {rate['megatron']:10.0f} tok/s")
    print(f"  tool, Hugging Face directory:            {rate['hf']:10.0f} tok/s")
    ratio = rate["megatron"] / rate["transformers"]
    print(f"ratio tool (Megatron) / transformers: {ratio:.2f} (goal >= 1.0)")
    print(f"ratio tool (HF backend) / transformers: {rate['hf'] / rate['transformers']:.2f}")
    print(json.dumps({"length": args.length, "tokens_per_s": rate, "ratio": ratio}))
    runtime.destroy()


if __name__ == "__main__":
    main()
