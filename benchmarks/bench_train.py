"""The paper's efficiency claim, measured here: PoSE trains at the short window whatever the target.

One tiny LLaMA (the `small` preset), one sample per step, the real trainer pieces (PoseGPTDataset on
the bundled corpus, DDP, optimizer, pipeline schedule). Three runs, each in a fresh process (so peak
memory is its own), alternated over rounds so machine noise hits all alike:
  pose:  seq 512, PoSE positions up to target 4096 (revised YaRN x8)
  plain: seq 512, positions 0..511 (same RoPE)
  full:  seq 4096, positions 0..4095 (full-length fine-tuning)
Prints PoSE/plain step time (goal <= 1.05), and PoSE/full step time and peak memory. Step time is
the process's CPU time per step on one thread, which other load on a shared machine inflates little.

    python benchmarks/bench_train.py [--steps 6] [--rounds 2] [--window 512 --target 4096]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

RUN_NAMES = ("pose", "plain", "full")


def runs(window: int, target: int) -> dict:
    """The three runs' sequence length, position range and content, for a window and a target."""
    return {
        "pose": dict(seq=window, target=target, content="skip"),
        "plain": dict(seq=window, target=window, content="contiguous"),
        "full": dict(seq=target, target=target, content="contiguous"),
    }


def measure(name: str, steps: int, window: int, target: int) -> dict:
    from pose_megatron import runtime
    from pose_megatron._compat import enable_cpu_fallbacks
    from pose_megatron.corpus import ensure_sample_corpus
    from pose_megatron.loader import build_data_iterator, build_pose_datasets
    from pose_megatron.positions import PoseSampling
    from pose_megatron.presets import get_preset
    from pose_megatron.rope import RopeScaling
    from pose_megatron.tokenizer import build_tokenizer
    from pose_megatron.train.build import setup_model_and_optimizer
    from pose_megatron.train.config import TrainingConfig
    from pose_megatron.train.step import train_step

    from common import peak_memory, reset_peak_memory

    import torch

    torch.set_num_threads(1)  # one thread: CPU time then counts work, not contended spin-waits
    run = runs(window, target)[name]
    corpus = ensure_sample_corpus()
    enable_cpu_fallbacks()
    runtime.initialize_distributed()
    runtime.initialize_model_parallel(1, 1)
    runtime.set_seed(0)
    tokenizer = build_tokenizer(corpus.tokenizer_type, corpus.tokenizer_model)
    model_cfg = get_preset("small", vocab_size=tokenizer.vocab_size)
    rope = RopeScaling("yarn-revised", factor=target / window, original_max_position_embeddings=window)
    training = TrainingConfig(train_iters=steps + 2, lr=1e-4, lr_warmup_iters=1, precision="fp32")
    model, optimizer, scheduler = setup_model_and_optimizer(model_cfg, rope, training, run["seq"], 1, 1,
                                                            global_batch_size=1)
    pose = PoseSampling(run["seq"], run["target"], content=run["content"])
    train_ds, _, _ = build_pose_datasets([corpus.train_prefix], None, "100,0,0", [steps + 2, 0, 0],
                                         0, tokenizer, pose)
    batches = build_data_iterator(train_ds, 0, 1, 0, 1)
    times = []
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            base = reset_peak_memory()
        # CPU time of the process (all its threads): robust to other load on a shared machine.
        start = time.process_time()
        train_step(model, optimizer, scheduler, batches, 1, run["seq"], 1)
        if i >= 2:
            times.append(time.process_time() - start)
    peak = peak_memory()
    runtime.destroy()
    return {"step_time": statistics.median(times), "peak_growth": peak - base, "peak": peak}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--window", type=int, default=512, help="the training window L_c")
    parser.add_argument("--target", type=int, default=4096, help="PoSE's target length L_t")
    parser.add_argument("--run", choices=RUN_NAMES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(measure(args.run, args.steps, args.window, args.target)))
        return
    results = {name: [] for name in RUN_NAMES}
    for _ in range(args.rounds):
        for name in RUN_NAMES:
            out = subprocess.run([sys.executable, __file__, "--run", name, "--steps", str(args.steps),
                                  "--window", str(args.window), "--target", str(args.target)],
                                 capture_output=True, text=True, check=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    step = {n: statistics.median(r["step_time"] for r in rs) for n, rs in results.items()}
    peak = {n: statistics.median(r["peak"] for r in rs) for n, rs in results.items()}
    growth = {n: statistics.median(r["peak_growth"] for r in rs) for n, rs in results.items()}
    print(f"step CPU time (median over {args.rounds} rounds x {args.steps} steps, one sample per step):")
    for name, run in runs(args.window, args.target).items():
        print(f"  {name:5s} seq {run['seq']:5d} target {run['target']:5d}: {step[name] * 1e3:8.1f} ms"
              f"   peak RSS {peak[name] / 2**20:8.1f} MiB")
    plain, full = f"plain {args.window}", f"full-length {args.target}"
    print(f"  ratio PoSE / {plain} step time = {step['pose'] / step['plain']:.3f}   (goal <= 1.05)")
    print(f"  ratio PoSE / {full} step time = {step['pose'] / step['full']:.3f}")
    print(f"  ratio PoSE / {full} peak memory = {peak['pose'] / peak['full']:.3f} "
          "(whole-process peak RSS, weights and optimizer included)")
    print(f"  ratio PoSE / {full} step memory = {growth['pose'] / growth['full']:.3f} "
          "(peak RSS growth during the measured steps: activations and temporaries)")


if __name__ == "__main__":
    main()
