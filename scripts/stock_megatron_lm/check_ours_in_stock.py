#!/usr/bin/env python3
"""Stock Megatron-LM continues this project's checkpoints (the other direction of
tests/distributed/test_stock_megatron_lm.py). A manual script, run once; pytest does not collect it.

    python scripts/stock_megatron_lm/check_ours_in_stock.py --megatron-lm PATH/TO/Megatron-LM \
        [--pythonpath DIR_WITH_six] [--workdir DIR]

1. With pose_megatron only: a tiny random Hugging Face LLaMA, converted (tools' convert_hf_to_megatron
   -> SAVE/release), then trained 2 iterations by this trainer from it (plain Adam, and once more
   with --use-distributed-optimizer).
2. With stock Megatron-LM's own code (megatron/training at tag core_v0.16.1, on CPU: stock_cpu.py),
   for each checkpoint: initialize_megatron with --use-checkpoint-args and no architecture flag,
   load_checkpoint, and the logits of a fixed batch compared with Hugging Face's (converted) and
   pose_megatron's own model (both) -- they must agree to 1e-6.
3. The same under torchrun with 2 processes: PP=2 with 2 model chunks per stage (layout E|t|t|L),
   load_checkpoint, and one stock train_step on the fixed batch.
Each stock run prints one RESULT line; the driver prints them all at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

SEQ, BATCH, VOCAB = 64, 2, 128
# Only what the checkpoint's args do not hold: the layer implementation, the tokenizer of the
# converted checkpoint (its args have none), the batch and the schedule the trainer saved.
STOCK_FLAGS = [
    "--use-checkpoint-args", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB - 1),
    "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3", "--lr", "1e-3",
    "--min-lr", "0.0", "--lr-decay-style", "linear", "--lr-warmup-iters", "1", "--weight-decay", "0.0",
    "--clip-grad", "1.0", "--ckpt-format", "torch_dist", "--mock-data", "--split", "100,0,0",
    "--eval-iters", "0", "--eval-interval", "1000", "--seed", "1234",
]
OUR_FLAGS = ["--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "4",
             "--train-iters", "3", "--exit-interval", "2", "--lr", "1e-3", "--lr-warmup-iters", "1",
             "--eval-iters", "0", "--split", "100,0,0", "--log-interval", "1"]
# (checkpoint, PP=2 with 2 chunks per stage, extra stock flags). The CPU-trained checkpoints hold no
# CUDA generator state: stock asks for --no-load-rng, which the first trained run shows.
RUNS = [
    ("converted", False, []), ("converted", True, []),
    ("trained", False, []), ("trained", False, ["--no-load-rng"]), ("trained", True, []),
    ("trained_distopt", False, ["--use-distributed-optimizer", "--no-load-rng"]),
    # dp_reshardable optimizer state does not reshard over PP, in stock as here: weights only.
    ("trained_distopt", True, ["--use-distributed-optimizer", "--no-load-optim"]),
]


def fixed_batch():
    import torch
    from stock_data import STOCK_RECORD

    rows = torch.tensor(STOCK_RECORD["fixed_batch"]["rows"])
    return {"tokens": rows[:, :SEQ].contiguous(), "labels": rows[:, 1:].contiguous(),
            "loss_mask": torch.ones(BATCH, SEQ), "attention_mask": None,
            "position_ids": torch.arange(SEQ).expand(BATCH, SEQ).contiguous()}


# ---- 1. this project's checkpoints ---------------------------------------------------------------

def prepare(workdir: str) -> None:
    import torch
    from stock_data import write_fixed_batch, write_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from pose_megatron.checkpoint.hf_import import convert_hf_to_megatron

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False)).eval()
    hf.save_pretrained(os.path.join(workdir, "hf"))
    batch = fixed_batch()
    with torch.no_grad():
        logits = hf(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                    attention_mask=torch.ones_like(batch["tokens"])).logits
    torch.save(logits, os.path.join(workdir, "hf_logits.pt"))
    convert_hf_to_megatron(os.path.join(workdir, "hf"), os.path.join(workdir, "converted"))
    data = write_fixed_batch(os.path.join(workdir, "fixed"))
    tokenizer = write_tokenizer(os.path.join(workdir, "tokenizer"))
    for name, extra in (("trained", []), ("trained_distopt", ["--use-distributed-optimizer"])):
        subprocess.run([sys.executable, "-m", "pose_megatron.train", "--load",
                        os.path.join(workdir, "converted"), "--finetune", *OUR_FLAGS, *extra,
                        "--data-path", data, "--tokenizer-type", "huggingface", "--tokenizer-model",
                        tokenizer, "--save", os.path.join(workdir, name)], check=True, cwd=REPO)


def our_logits(load: str):
    """pose_megatron's own model from `load`, on the fixed batch (TP = PP = 1)."""
    import torch

    from pose_megatron.checkpoint.layout import load_run_config, resolve_checkpoint_dir
    from pose_megatron.checkpoint.megatron_io import load_model_weights
    from pose_megatron.model import build_model, build_transformer_config

    config = load_run_config(resolve_checkpoint_dir(load))
    model = build_model(config.model, build_transformer_config(config.model), config.rope_scaling)
    load_model_weights(load, model)
    batch = fixed_batch()
    with torch.no_grad():
        return model.eval()(batch["tokens"], batch["position_ids"], None)


# ---- 2. and 3. stock Megatron-LM ---------------------------------------------------------------

def stock_run(opts) -> None:
    import stock_cpu

    stock_cpu.apply(opts.megatron_lm, opts.pythonpath)
    import torch
    import megatron.training.initialize as initialize
    from megatron.core import mpu
    from megatron.core.enums import ModelType
    from megatron.core.rerun_state_machine import RerunDataIterator
    from megatron.training import get_args
    from megatron.training.training import setup_model_and_optimizer

    import pretrain_gpt
    from gpt_builders import gpt_builder
    from model_provider import model_provider
    from make_test_checkpoint import train_one_step

    pipeline = ["--pipeline-model-parallel-size", "2", "--pipeline-model-parallel-layout", "E|t|t|L"]
    extra = (pipeline if opts.vpp else []) + opts.stock_flag
    sys.argv = [sys.argv[0], "--load", opts.load] + STOCK_FLAGS + stock_cpu.FLAGS_FOR_CPU + extra
    initialize.initialize_megatron(allow_no_cuda=True)
    stock_cpu.patch_pretrain_gpt(pretrain_gpt)
    args = get_args()
    copied = {k: getattr(args, k) for k in ("num_layers", "hidden_size", "num_attention_heads",
                                             "num_query_groups", "ffn_hidden_size", "seq_length",
                                             "padded_vocab_size", "rotary_base", "normalization")}
    load, args.load = args.load, None  # built without loading: load_checkpoint_on_cpu loads
    model, optimizer, scheduler = setup_model_and_optimizer(
        stock_cpu.cpu_model_provider(model_provider, gpt_builder), ModelType.encoder_or_decoder)
    args.load = load
    args.iteration, _ = stock_cpu.load_checkpoint_on_cpu(model, optimizer, scheduler)
    result = {"load": os.path.basename(opts.load.rstrip("/")), "rank": torch.distributed.get_rank(),
              "pp": mpu.get_pipeline_model_parallel_world_size(), "model_chunks": len(model),
              "iteration": args.iteration, "consumed_train_samples": args.consumed_train_samples,
              "from_checkpoint_args": copied, "scheduler_num_steps": scheduler.num_steps}
    batch = fixed_batch()
    if not opts.vpp:
        with torch.no_grad():
            logits = model[0].eval()(batch["tokens"], batch["position_ids"], None)  # [b, s, v]
        model[0].train()
        ours = our_logits(opts.load)
        result["max_abs_diff_vs_pose_megatron"] = (logits - ours).abs().max().item()
        # The fixed batch's loss from each model's logits (the PP=2 step below reports its own).
        for who, out in (("stock", logits), ("pose_megatron", ours)):
            result[f"fixed_batch_loss_{who}"] = torch.nn.functional.cross_entropy(
                out.reshape(-1, out.shape[-1]), batch["labels"].reshape(-1)).item()
        if "converted" in opts.load:
            hf = torch.load(os.path.join(opts.workdir, "hf_logits.pt"))
            result["max_abs_diff_vs_hugging_face"] = (logits[..., :VOCAB] - hf).abs().max().item()
    else:
        data = [RerunDataIterator(iter([batch, batch])) for _ in model]
        loss, grad_norm, lr = train_one_step(args, model, optimizer, scheduler, pretrain_gpt, data,
                                             args.iteration)
        if mpu.is_pipeline_last_stage(ignore_virtual=True):
            result.update(trained_one_step=True, step_loss=loss, grad_norm=grad_norm, lr_after=lr)
    print("RESULT " + json.dumps(result), flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megatron-lm", required=True, help="Megatron-LM source tree at core_v0.16.1")
    parser.add_argument("--pythonpath", action="append", default=[],
                        help="extra directory for megatron.training's dependencies (six)")
    parser.add_argument("--workdir", default="/tmp/pose_megatron_in_stock")
    parser.add_argument("--stock-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--vpp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stock-flag", action="append", default=[], help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.stock_run:
        stock_run(opts)
        return 0
    os.makedirs(opts.workdir, exist_ok=True)
    if not os.path.isdir(os.path.join(opts.workdir, "trained_distopt")):
        prepare(opts.workdir)
    base = [__file__, "--stock-run", "--megatron-lm", opts.megatron_lm, "--workdir", opts.workdir]
    base += [f"--pythonpath={p}" for p in opts.pythonpath]
    results = []
    for name, vpp, flags in RUNS:
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--nproc-per-node", "2"] if vpp else [sys.executable])
        cmd = (launcher + base + ["--load", os.path.join(opts.workdir, name)]
               + (["--vpp"] if vpp else []) + [f"--stock-flag={f}" for f in flags])
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        output = proc.stdout + proc.stderr
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        notes = [line.strip()[:300] for line in output.splitlines()
                 if any(k in line for k in ("RNG state will be ignored", "checkpoint version",
                                            "Traceback", "Error", "Unable to load",
                                            "successfully loaded", "could not find arguments"))]
        results.append({"checkpoint": name, "pp2_two_chunks_per_stage": vpp, "stock_flags": flags,
                        "returncode": proc.returncode, "traceback": "Traceback" in output,
                        "results": [json.loads(line[len("RESULT "):]) for line in lines],
                        "stock_log": sorted(set(notes))})
        print(json.dumps(results[-1], indent=1), flush=True)
    return 0 if not any(r["traceback"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
