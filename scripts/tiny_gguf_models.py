"""Tiny random models for scripts/verify_llamacpp.py, in each family's Hugging Face layout.

The q/k weights are scaled up so that attention is sharp and a wrong RoPE shows in the logits (the
check's control needs RoPE to move them by >= 0.1). Baichuan2 gets 32 layers, the only depth at which
llama.cpp applies Baichuan's RoPE, and output rows of very different norms so that its NormHead
matters; its layers after the first two write little into the residual stream (QUIET_SCALE), so
that float32 rounding does not grow through 32 layers beyond the check's tolerance. The reference for Baichuan2 is transformers' LLaMA with Baichuan's weights mapped onto it
(W_pack split into q / k / v, lm_head rows normalised), which is Baichuan2-7B's architecture
(docs/reference.md, "Checkpoint layouts").
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pose_megatron.checkpoint.families import FAMILIES
from pose_megatron.checkpoint.hf_arch import hf_config_for_export
from pose_megatron.presets import ModelConfig
from pose_megatron.rope import RopeScaling

VOCAB, WINDOW, FACTOR = 512, 64, 8.0
WEIGHT_STD, QK_SCALE = 0.08, 4.0
# Layers after the first two write this much less into the residual stream (o_proj, down_proj): 32
# layers of sharp attention at full weight are chaotic in float32 (transformers' own float32 logits
# then differ from float64 by 1e-2, above the check's 1e-3), while these still apply RoPE.
QUIET_LAYERS_FROM, QUIET_SCALE = 2, 0.05
MODELS = {
    "llama": ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                         ffn_hidden_size=96, vocab_size=VOCAB, max_position_embeddings=WINDOW),
    "baichuan2": ModelConfig(num_layers=32, hidden_size=64, num_attention_heads=4, num_query_groups=4,
                             ffn_hidden_size=96, vocab_size=VOCAB, max_position_embeddings=WINDOW,
                             norm_epsilon=1e-6, norm_head=True),
}


def train_tokenizer(path: Path) -> None:
    """A sentencepiece BPE model (the converter needs one; the check feeds token ids, not text)."""
    import sentencepiece as spm

    root = Path(__file__).resolve().parents[1]
    text = "\n".join((root / name).read_text() for name in ("README.md", "docs/reference.md"))
    corpus = path.with_suffix(".txt")
    corpus.write_text(text)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(path.with_suffix("")),
                                   vocab_size=VOCAB, model_type="bpe", unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, character_coverage=1.0, minloglevel=2)


def _matrix(generator, rows, cols, scale=1.0):
    return torch.randn(rows, cols, generator=generator) * WEIGHT_STD * scale


def _norm(generator, size):
    return torch.rand(size, generator=generator) * 0.4 + 0.8


def _llama_state(cfg: ModelConfig, generator) -> dict:
    h, d = cfg.hidden_size, cfg.head_dim
    kv = cfg.num_query_groups * d
    state = {"model.embed_tokens.weight": _matrix(generator, cfg.vocab_size, h),
             "model.norm.weight": _norm(generator, h), "lm_head.weight": _matrix(generator, cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out_scale = QUIET_SCALE if i >= QUIET_LAYERS_FROM else 1.0
        state.update({
            p + "input_layernorm.weight": _norm(generator, h),
            p + "self_attn.q_proj.weight": _matrix(generator, h, h, QK_SCALE),
            p + "self_attn.k_proj.weight": _matrix(generator, kv, h, QK_SCALE),
            p + "self_attn.v_proj.weight": _matrix(generator, kv, h),
            p + "self_attn.o_proj.weight": _matrix(generator, h, h, out_scale),
            p + "post_attention_layernorm.weight": _norm(generator, h),
            p + "mlp.gate_proj.weight": _matrix(generator, cfg.ffn_hidden_size, h),
            p + "mlp.up_proj.weight": _matrix(generator, cfg.ffn_hidden_size, h),
            p + "mlp.down_proj.weight": _matrix(generator, h, cfg.ffn_hidden_size, out_scale),
        })
    return state


def _to_baichuan(state: dict, cfg: ModelConfig, generator) -> dict:
    """LLaMA tensors -> Baichuan's layout: W_pack = [Wq; Wk; Wv]; lm_head rows of varied norms."""
    out = {}
    for name, tensor in state.items():
        if ".self_attn.q_proj." in name:
            prefix = name.split("q_proj")[0]
            out[prefix + "W_pack.weight"] = torch.cat(
                [state[prefix + f"{x}_proj.weight"] for x in "qkv"])
        elif not any(f".self_attn.{x}_proj." in name for x in "kv"):
            out[name] = tensor
    out["lm_head.weight"] = out["lm_head.weight"] * (torch.rand(cfg.vocab_size, 1, generator=generator) * 4 + 0.1)
    return out


def build_model_dir(family: str, scaling: RopeScaling, path: Path, tokenizer: Path, seed: int = 0) -> Path:
    """A random HF checkpoint in `family`'s layout whose config.json is what the exporter writes
    for `scaling` (so the import reads exactly that RoPE back)."""
    cfg = MODELS[family]
    generator = torch.Generator().manual_seed(seed)
    state = _llama_state(cfg, generator)
    if family != "llama":
        state = _to_baichuan(state, cfg, generator)
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    config = hf_config_for_export(cfg, scaling, FAMILIES[family], int(WINDOW * FACTOR), torch.float32,
                                  seq_length=WINDOW)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return path


def reference_model(family: str, export: Path):
    """transformers' model for an export directory: stock LLaMA, or Baichuan2 mapped onto LLaMA."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if family == "llama":
        return AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32,
                                                    attn_implementation="eager").eval()
    config = json.loads((export / "config.json").read_text())
    llama = LlamaConfig(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"], num_key_value_heads=config["num_attention_heads"],
        head_dim=config["head_dim"], rms_norm_eps=config["rms_norm_eps"], tie_word_embeddings=False,
        max_position_embeddings=config["max_position_embeddings"], rope_parameters=config["rope_parameters"],
        attn_implementation="eager")
    state = {}
    for name, tensor in load_file(str(export / "model.safetensors")).items():
        if name.endswith("W_pack.weight"):
            prefix = name.removesuffix("W_pack.weight")
            for part, piece in zip("qkv", tensor.chunk(3)):
                state[f"{prefix}{part}_proj.weight"] = piece
        else:
            state[name] = tensor
    state["lm_head.weight"] = F.normalize(state["lm_head.weight"], dim=-1)  # NormHead
    model = LlamaForCausalLM(llama).eval()
    model.load_state_dict(state, strict=True)
    return model
