"""torchrun worker (4 ranks): an imported HF checkpoint at TP x PP in {1,2}^2.

argv: CKPT (the importer's save dir), CASE (a .pt with tokens, positions, the HF logits, the model
config and RoPE), OUT (a directory). For each layout: build PoseGPTModel, check the vocabulary padding,
`load_model_weights`, run a forward (through the pipeline by hand) and record the largest difference
from the HF logits. At TP=2 x PP=2 the weights are then changed (an elementwise function, so every
sharding agrees on it), the model's logits are recorded and the model is saved with
`save_model_weights`: the test exports that sharded checkpoint back to Hugging Face.

Imports live inside the functions: megatron's checkpoint save spawns a helper process that re-imports
this module, and a bare module keeps that cheap.
"""

import sys

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def pipeline_logits(model, tokens, positions, hidden):
    """Full-vocabulary logits [b, s, V] on the last stage (None elsewhere)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not ps.is_pipeline_first_stage():
        received = torch.empty(tokens.size(1), tokens.size(0), hidden)  # [s, b, h]
        dist.recv(received, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(received)
    with torch.no_grad():
        out = model(tokens, positions, None)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    parts = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)  # [b, s, padded V]


def main(ckpt: str, case_path: str, out_dir: str) -> None:
    import dataclasses
    import json

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from pose_megatron import runtime

    from pose_megatron._compat import enable_cpu_fallbacks
    from pose_megatron.checkpoint.vocab_padding import check_vocab_padding
    from pose_megatron.checkpoint.layout import load_run_config, resolve_checkpoint_dir
    from pose_megatron.checkpoint.megatron_io import load_model_weights, save_model_weights
    from tiny_models import pose_llama

    enable_cpu_fallbacks()

    runtime.initialize_distributed()
    case = torch.load(case_path, weights_only=False)
    run_config = load_run_config(resolve_checkpoint_dir(ckpt))
    cfg, scaling = run_config.model, run_config.rope_scaling
    tokens, positions, expected = case["tokens"], case["positions"], case["logits"]
    report = {}
    for tp, pp in LAYOUTS:
        runtime.initialize_model_parallel(tp, pp)
        runtime.set_seed(1234)
        check_vocab_padding(run_config, tp, ckpt)
        model = pose_llama(cfg, scaling).eval()
        load_model_weights(ckpt, model)
        logits = pipeline_logits(model, tokens, positions, cfg.hidden_size)
        if logits is not None:
            report[f"{tp},{pp}"] = (logits[..., : cfg.vocab_size] - expected).abs().max().item()
            # Vocabulary padding rows must be the importer's zeros.
            report[f"{tp},{pp} padding"] = logits[..., cfg.vocab_size:].abs().max().item()
        if (tp, pp) == (2, 2):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.sin(7.0 * p))
            trained = pipeline_logits(model, tokens, positions, cfg.hidden_size)
            saved = dataclasses.replace(run_config, seq_length=32, target_length=case["target"], extra={})
            save_model_weights(f"{out_dir}/trained", 5, model, saved)
            if trained is not None and ps.get_tensor_model_parallel_rank() == 0:
                path = f"{out_dir}/trained_logits_rank{dist.get_rank()}.pt"
                torch.save(trained[..., : cfg.vocab_size], path)
        dist.barrier()
    if dist.get_rank() == dist.get_world_size() - 1:
        with open(f"{out_dir}/report.json", "w") as f:
            json.dump(report, f)
    runtime.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:4])
