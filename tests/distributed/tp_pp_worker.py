"""torchrun worker: PoseGPTModel's loss at TP x PP in {1,2}^2 on the same weights and PoSE batch.

TP=1 PP=1 saves a megatron dist checkpoint; each other layout loads it (resharding) and runs the
pipeline schedule with forward and backward. The global last rank (always a last pipeline stage)
writes {"tp,pp": loss} to the JSON file given as argv[1].
"""

import json
import sys

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from pose_megatron import runtime
from pose_megatron._compat import enable_cpu_fallbacks
from pose_megatron.train.step import forward_step
from tiny_models import ROPE_CASES, TINY, pose_llama, pose_positions

SEQ, MICRO, NUM_MICRO = 32, 2, 2
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def batches():
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, TINY.vocab_size, (NUM_MICRO, MICRO, SEQ + 1), generator=g)
    positions = torch.stack([pose_positions(MICRO, SEQ + 1, 8 * SEQ, seed=i) for i in range(NUM_MICRO)])
    for m in range(NUM_MICRO):
        yield {
            "tokens": tokens[m, :, :-1], "labels": tokens[m, :, 1:],
            "position_ids": positions[m, :, :-1], "loss_mask": torch.ones(MICRO, SEQ),
        }


def main(out_path: str, ckpt_dir: str) -> None:
    enable_cpu_fallbacks()
    runtime.initialize_distributed()
    results = {}
    for tp, pp in LAYOUTS:
        runtime.initialize_model_parallel(tp, pp)
        runtime.set_seed(1234)
        model = pose_llama(TINY, ROPE_CASES["yarn-revised"])
        if (tp, pp) == (1, 1):
            dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
        else:
            model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir))
        reports = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=batches(), model=[model],
            num_microbatches=NUM_MICRO, seq_length=SEQ, micro_batch_size=MICRO, forward_only=False,
        )
        if ps.is_pipeline_last_stage():
            total = torch.stack([r["lm loss"] for r in reports]).sum(0)
            results[f"{tp},{pp}"] = (total[0] / total[1]).item()
            # Gradients must flow: every parameter of this stage received one.
            assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        dist.barrier()
    if dist.get_rank() == dist.get_world_size() - 1:
        with open(out_path, "w") as f:
            json.dump(results, f)
    runtime.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
