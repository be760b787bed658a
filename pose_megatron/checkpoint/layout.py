"""Megatron-LM's checkpoint directory convention, and the run configuration stored beside the weights.

    SAVE/
      latest_checkpointed_iteration.txt   "100" (or "release" for a converted checkpoint)
      iter_0000100/                        torch_dist dist checkpoint (metadata.json, *.distcp, common.pt)
        pose_config.json                   the model architecture and RoPE scaling (see RunConfig)
      release/                             what the Hugging Face importer writes

A checkpoint directory is written under a temporary name and renamed when complete; the tracker file
is replaced atomically after that, so a run killed during a save leaves the previous one the latest.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from pose_megatron.files import INCOMPLETE_SUFFIX, atomic_write_text
from pose_megatron.presets import ModelConfig
from pose_megatron.rope import RopeScaling

TRACKER_FILE = "latest_checkpointed_iteration.txt"
CONFIG_FILE = "pose_config.json"
RELEASE = "release"
FORMAT_VERSION = 1

Iteration = Union[int, str]  # an iteration number, or RELEASE


@dataclass
class RunConfig:
    """What a checkpoint needs to be rebuilt without repeating model flags."""

    model: ModelConfig
    """Architecture (vocab_size is the tokenizer's, before TP padding)."""
    rope_scaling: RopeScaling
    """RoPE scaling the weights were trained (or converted) with."""
    family: str = "llama"
    """Hugging Face family for export: a key of checkpoint.families.FAMILIES ("llama", "baichuan",
    "baichuan2"; older files say "baichuan" with model.norm_head for Baichuan2)."""
    seq_length: Optional[int] = None
    """Training window L_c of the run that wrote it (None for an import)."""
    target_length: Optional[int] = None
    """PoSE target length L_t (max_position_embeddings on export is `max_positions`)."""
    extra: dict = field(default_factory=dict)
    """Free-form provenance (source model, tokenizer, converter arguments)."""

    @property
    def max_positions(self) -> int:
        """Positions the model covers, which an export declares as max_position_embeddings: the
        largest of the PoSE target length, the window L_c (the run's seq_length, else the model's
        window) times the RoPE factor, and the imported base model's own max_position_embeddings
        (`extra["hf_config"]`; no family renames that key), so that fine-tuning at a shorter
        window never declares less context than the base model had."""
        window = self.seq_length or self.model.max_position_embeddings
        candidates = [round(window * self.rope_scaling.factor)]
        if self.target_length:
            candidates.append(int(self.target_length))
        base = (self.extra.get("hf_config") or {}).get("max_position_embeddings")
        if isinstance(base, int) and not isinstance(base, bool) and base > 0:
            candidates.append(base)
        return max(candidates)

    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "family": self.family,
            "model": dataclasses.asdict(self.model),
            "rope_scaling": dataclasses.asdict(self.rope_scaling),
            "seq_length": self.seq_length,
            "target_length": self.target_length,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict) -> "RunConfig":
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{CONFIG_FILE} has format_version {version!r}; this pose_megatron "
                             f"reads version {FORMAT_VERSION}")
        return cls(
            model=ModelConfig(**data["model"]),
            rope_scaling=RopeScaling(**data["rope_scaling"]),
            family=data.get("family", "llama"),
            seq_length=data.get("seq_length"),
            target_length=data.get("target_length"),
            extra=data.get("extra", {}),
        )


def iteration_dirname(iteration: Iteration) -> str:
    return RELEASE if iteration == RELEASE else f"iter_{int(iteration):07d}"


def read_tracker(root: Union[str, Path]) -> Optional[Iteration]:
    """The latest complete iteration under root, or None when root holds no checkpoint."""
    tracker = Path(root) / TRACKER_FILE
    if not tracker.exists():
        return None
    text = tracker.read_text().strip()
    if text == RELEASE:
        return RELEASE
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{tracker} holds {text!r}, expected an iteration number or 'release'")


def write_tracker(root: Union[str, Path], iteration: Iteration) -> None:
    atomic_write_text(Path(root) / TRACKER_FILE, f"{iteration}\n")


def holds_checkpoint(path: Union[str, Path]) -> bool:
    """True when `path` is a save root with a tracker or a checkpoint directory itself."""
    path = Path(path)
    return (path / TRACKER_FILE).is_file() or (path / "metadata.json").is_file()


def why_no_checkpoint(path: Union[str, Path], flag: str = "--load") -> str:
    """The error for a path that holds no checkpoint, saying what it is and what to do."""
    load = str(path)
    if not os.path.exists(load):
        return f"{flag} {load} does not exist"
    if os.path.isfile(os.path.join(load, "config.json")):
        return (f"{flag} {load} is a Hugging Face model directory, not a Megatron checkpoint; convert "
                f"it first: python tools/convert_hf_to_megatron.py --hf-dir {load} --save DIR, then "
                "--load DIR")
    incomplete = sorted(n for n in os.listdir(load) if n.endswith(INCOMPLETE_SUFFIX)) \
        if os.path.isdir(load) else []
    if incomplete:
        return (f"{flag} {load} holds only an interrupted save or conversion ({incomplete[0]}); "
                "run the conversion again, or load an earlier checkpoint")
    return (f"{flag} {load} holds no checkpoint (no latest_checkpointed_iteration.txt or "
            "metadata.json); pass a run's --save directory or a converted checkpoint")


def resolve_checkpoint_dir(path: Union[str, Path]) -> Path:
    """The checkpoint directory that `path` names: a save root (via its tracker) or an iter_* dir."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    iteration = read_tracker(path)
    if iteration is not None:
        ckpt = path / iteration_dirname(iteration)
    elif (path / "metadata.json").exists():
        ckpt = path
    else:
        raise FileNotFoundError(
            f"{path} holds no {TRACKER_FILE} and is no checkpoint directory (no metadata.json): "
            "pass the --save directory of a run, or one of its iter_* directories"
        )
    if not (ckpt / "metadata.json").exists():
        if any(ckpt.glob("mp_rank_*")):
            raise FileNotFoundError(
                f"{ckpt} is in Megatron-LM's legacy --ckpt-format torch (mp_rank_*/"
                "model_optim_rng.pt), which pose_megatron does not read: convert it to torch_dist "
                "with Megatron-LM (--ckpt-convert-format torch_dist --ckpt-convert-save DIR)")
        raise FileNotFoundError(f"{ckpt} is incomplete or missing (no metadata.json)")
    return ckpt


def save_run_config(ckpt_dir: Union[str, Path], config: RunConfig) -> None:
    atomic_write_text(Path(ckpt_dir) / CONFIG_FILE, json.dumps(config.to_json(), indent=2) + "\n")


def load_run_config(ckpt_dir: Union[str, Path]) -> Optional[RunConfig]:
    """The RunConfig stored in a checkpoint directory, or None for checkpoints without one."""
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.exists():
        return None
    return RunConfig.from_json(json.loads(path.read_text()))
