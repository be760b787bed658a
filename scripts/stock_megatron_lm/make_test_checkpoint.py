#!/usr/bin/env python3
"""Write tests/data/stock_megatron_lm: a tiny checkpoint saved by STOCK Megatron-LM, and its losses.

    python scripts/stock_megatron_lm/make_test_checkpoint.py --megatron-lm PATH/TO/Megatron-LM \
        [--pythonpath DIR_WITH_six] [--out tests/data/stock_megatron_lm]

A manual script (run once; pytest does not collect it). It runs Megatron-LM's own code from a source
tree at tag core_v0.16.1 on CPU (stock_cpu.py): initialize_megatron, setup_model_and_optimizer, one
train_step of pretrain_gpt.forward_step on its mock data, then save_checkpoint(iteration 1). It then
records, still with stock code, the loss of one fixed batch (`loss`), one more train_step on that
batch twice over (the step's loss, grad norm and learning rate), and the fixed batch's loss after it
(`loss_after_step`). tests/distributed/test_stock_megatron_lm.py resumes the checkpoint with this
project's trainer on the same batch and expects the same numbers.

The model: 2 layers, hidden 32, 4 heads in 2 query groups, SwiGLU 64, RMSNorm, RoPE, untied, no
biases, NullTokenizer with 127 tokens + EOD (padded vocabulary 128), fp32, the distributed optimizer,
so that weights and Adam state stay under 1 MB. Nothing from megatron.training is pickled into it
(checked here and by the tests), so it loads with megatron-core alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import stock_cpu  # noqa: E402

TAG = "core_v0.16.1"
FIXED_BATCH_SEED = 20240531
VOCAB = 127  # NullTokenizer adds EOD (id 127): 128 tokens, padded to 128
MODEL_FLAGS = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2", "--ffn-hidden-size", "64",
    "--seq-length", "64", "--max-position-embeddings", "64", "--position-embedding-type", "rope",
    "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
    "--untie-embeddings-and-output-weights", "--hidden-dropout", "0.0", "--attention-dropout", "0.0",
]
RUN_FLAGS = [
    "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
    "--weight-decay", "0.1", "--clip-grad", "1.0", "--seed", "1234", "--use-distributed-optimizer",
    "--ckpt-format", "torch_dist", "--mock-data", "--tokenizer-type", "NullTokenizer",
    "--vocab-size", str(VOCAB), "--split", "100,0,0", "--eval-iters", "0", "--eval-interval", "1000",
    "--log-interval", "1", "--save-interval", "1",
]
MAX_BYTES = 1 << 20


def fixed_batch():
    """Two rows of 65 random tokens: inputs [:64], labels [1:], plain positions."""
    import torch

    rows = torch.randint(0, VOCAB, (2, 65), generator=torch.Generator().manual_seed(FIXED_BATCH_SEED))
    return rows, {"tokens": rows[:, :64].contiguous(), "labels": rows[:, 1:].contiguous(),
                  "loss_mask": torch.ones(2, 64), "attention_mask": None,
                  "position_ids": torch.arange(64).expand(2, 64).contiguous()}


def fixed_batch_loss(model, pretrain_gpt, batch) -> float:
    """The token-weighted lm loss of `batch`, as stock evaluate() computes it (eval mode, the
    forward-only schedule, pretrain_gpt's loss_func)."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.rerun_state_machine import RerunMode, get_rerun_state_machine

    rerun = get_rerun_state_machine()
    mode = rerun.get_mode()
    rerun.set_mode(RerunMode.DISABLED)
    for chunk in model:
        chunk.eval()
    with torch.no_grad():
        reports = get_forward_backward_func()(
            forward_step_func=pretrain_gpt.forward_step, data_iterator=iter([batch]), model=model,
            num_microbatches=1, seq_length=64, micro_batch_size=2, forward_only=True)
    for chunk in model:
        chunk.train()
    rerun.set_mode(mode)
    total = torch.stack([r["lm loss"].view(-1) for r in reports]).sum(0)  # [loss sum, tokens]
    return (total[0] / total[1]).item()


def train_one_step(args, model, optimizer, scheduler, pretrain_gpt, data_iterator, iteration):
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config
    from megatron.training.training import train_step

    config = get_model_config(model[0])
    config.grad_scale_func = optimizer.scale_loss
    config.timers = None
    losses, skipped, *_, grad_norm, _zeros, _logit = train_step(
        pretrain_gpt.forward_step, data_iterator, model, optimizer, scheduler, config,
        get_forward_backward_func(), iteration=iteration)
    assert not skipped, "the stock step was skipped"
    args.consumed_train_samples += args.global_batch_size  # as train() counts after a step
    loss = losses.get("lm loss")  # only the last pipeline stage has it
    return (None if loss is None else float(loss)), float(grad_norm), optimizer.param_groups[0]["lr"]


def check_pickles(ckpt_dir: str) -> int:
    """Bytes of the checkpoint; fails if any file names a megatron.training class."""
    total = 0
    for root, _dirs, files in os.walk(ckpt_dir):
        for name in files:
            data = open(os.path.join(root, name), "rb").read()
            total += len(data)
            assert b"megatron.training" not in data, f"{name} pickles a megatron.training object"
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megatron-lm", required=True, help=f"Megatron-LM source tree at tag {TAG}")
    parser.add_argument("--pythonpath", action="append", default=[],
                        help="extra directory for megatron.training's dependencies (six)")
    parser.add_argument("--out", default=os.path.join(HERE, "..", "..", "tests", "data",
                                                      "stock_megatron_lm"))
    opts = parser.parse_args(argv)
    out = os.path.abspath(opts.out)
    ckpt_root = os.path.join(out, "checkpoint")
    if os.path.exists(ckpt_root):
        shutil.rmtree(ckpt_root)
    os.makedirs(out, exist_ok=True)

    stock_cpu.apply(opts.megatron_lm, opts.pythonpath)
    import megatron.training.initialize as initialize
    from megatron.core.enums import ModelType
    from megatron.training import get_args
    from megatron.training.checkpointing import save_checkpoint
    from megatron.training.training import build_train_valid_test_data_iterators, setup_model_and_optimizer

    import pretrain_gpt  # from the tree; its __main__ block does not run
    from gpt_builders import gpt_builder
    from model_provider import model_provider

    flags = MODEL_FLAGS + RUN_FLAGS + stock_cpu.FLAGS_FOR_CPU + ["--save", ckpt_root]
    sys.argv = [sys.argv[0]] + flags
    initialize.initialize_megatron(allow_no_cuda=True)
    stock_cpu.patch_pretrain_gpt(pretrain_gpt)
    args = get_args()
    model, optimizer, scheduler = setup_model_and_optimizer(
        stock_cpu.cpu_model_provider(model_provider, gpt_builder), ModelType.encoder_or_decoder)
    provider = pretrain_gpt.train_valid_test_datasets_provider
    provider.is_distributed = True
    mock_data = build_train_valid_test_data_iterators(provider)[0]
    step1 = train_one_step(args, model, optimizer, scheduler, pretrain_gpt, mock_data, 0)
    args.iteration = 1
    save_checkpoint(1, model, optimizer, scheduler, num_floating_point_operations_so_far=0)

    rows, batch = fixed_batch()
    loss = fixed_batch_loss(model, pretrain_gpt, batch)
    from megatron.core.rerun_state_machine import RerunDataIterator

    step2 = train_one_step(args, model, optimizer, scheduler, pretrain_gpt,
                           RerunDataIterator(iter([batch, batch])), 1)
    loss_after = fixed_batch_loss(model, pretrain_gpt, batch)

    size = check_pickles(ckpt_root)
    assert size < MAX_BYTES, f"the checkpoint is {size} bytes, over {MAX_BYTES}"
    record = {
        "written_by": f"stock Megatron-LM {TAG} (megatron/training) on CPU, "
                      "scripts/stock_megatron_lm/make_test_checkpoint.py",
        "checkpoint": "checkpoint", "checkpoint_bytes": size, "iteration": 1,
        "consumed_train_samples": 4, "megatron_lm_flags": MODEL_FLAGS + RUN_FLAGS,
        "first_step_loss_on_mock_data": step1[0],
        "fixed_batch": {"seed": FIXED_BATCH_SEED, "rows": rows.tolist(),
                        "about": "each row: 65 tokens; inputs row[:64], labels row[1:], positions 0..63"},
        "loss": loss,
        "step_on_fixed_batch": {"about": "iteration 2: the fixed batch twice (2 micro-batches of 2)",
                                "loss": step2[0], "grad_norm": step2[1], "lr_after": step2[2]},
        "loss_after_step": loss_after,
    }
    with open(os.path.join(out, "stock_loss.json"), "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print(json.dumps({k: v for k, v in record.items() if k != "fixed_batch"}, indent=1))
    import torch

    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
