"""RoPE frequency scaling for PoSE and the rotary module that turns position ids into angles.

PoSE trains at the original window L_c with position ids that jump up to L_t - 1; the model
only sees long distances through those ids, so the rotary frequencies decide how the model
reads them. Each scaling type is a pure function ``(scaling, head_dim, base) -> (inv_freq,
attention_factor)`` in ``ROPE_SCALING_FUNCTIONS``; ``compute_inv_freq`` is the public entry.

Numerics: every function reproduces the float32 arithmetic of the matching Hugging Face
transformers computation (same operations, same order) rather than computing in float64 and
rounding once. Computing in float64 is "more exact" but differs from transformers by one ulp
in about a third of the entries, and one ulp of inv_freq times a position of 16k is already
~1e-3 rad of angle; an exported checkpoint must reproduce the trained model's angles bitwise,
so the float32 recipe of the export target is the faithful one. Scalars that never become
tensors (correction range, attention factor, the NTK base, the revised-YaRN extension
factors) are computed in Python float64, exactly as an exporter writes them to config.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

ROPE_TYPES: Tuple[str, ...] = ("default", "linear", "ntk", "yarn", "yarn-revised", "llama3")
# Types whose formula depends on the pre-training context length.
_NEEDS_ORIGINAL_MAX = ("yarn", "yarn-revised", "llama3")
# Types that produce an attention factor other than 1 (and so accept an override).
_HAS_ATTENTION_FACTOR = ("yarn", "yarn-revised")


@dataclass
class RopeScaling:
    """How the rotary frequencies are scaled. Field names follow Hugging Face `rope_parameters`."""

    rope_type: str = field(default="default", metadata={"choices": ROPE_TYPES})
    """One of "default", "linear", "ntk" (PoSE's static NTK), "yarn" (YaRN / HF yarn),
    "yarn-revised" (PoSE's YaRN: blend of wavelengths), "llama3"."""

    factor: float = 1.0
    """Context extension factor s = L_t / L_c; must be >= 1 (and exactly 1 for "default")."""

    original_max_position_embeddings: Optional[int] = None
    """Pre-training context length L_o (the PoSE training window L_c); required by yarn,
    yarn-revised and llama3, ignored by the others."""

    beta_fast: float = 32.0
    """YaRN: rotations over L_o above which a dimension is extrapolated (kept unscaled)."""

    beta_slow: float = 1.0
    """YaRN: rotations over L_o below which a dimension is fully interpolated (divided by s)."""

    low_freq_factor: float = 1.0
    """llama3: wavelengths longer than L_o / low_freq_factor are divided by the factor."""

    high_freq_factor: float = 4.0
    """llama3: wavelengths shorter than L_o / high_freq_factor are left unchanged."""

    attention_factor: Optional[float] = None
    """yarn / yarn-revised: override of the attention factor (mscale) that multiplies cos and sin;
    None means the YaRN formula 0.1 * ln(s) + 1."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the offending field and what it accepts."""
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {list(ROPE_TYPES)}, got {self.rope_type!r}")
        if not _is_real(self.factor) or not math.isfinite(self.factor) or self.factor < 1.0:
            raise ValueError(f"factor must be a finite number >= 1, got {self.factor!r}")
        if self.rope_type == "default" and self.factor != 1.0:
            raise ValueError(
                f"factor must be 1.0 for rope_type 'default' (it would be ignored), got {self.factor!r}; "
                "use 'linear', 'ntk', 'yarn', 'yarn-revised' or 'llama3' to scale"
            )
        omax = self.original_max_position_embeddings
        if omax is None:
            if self.rope_type in _NEEDS_ORIGINAL_MAX:
                raise ValueError(
                    f"original_max_position_embeddings is required for rope_type {self.rope_type!r} "
                    f"(types needing it: {list(_NEEDS_ORIGINAL_MAX)})"
                )
        elif isinstance(omax, bool) or not isinstance(omax, int) or omax <= 0:
            raise ValueError(f"original_max_position_embeddings must be a positive int, got {omax!r}")
        for name in ("beta_fast", "beta_slow"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.beta_fast <= self.beta_slow:
            raise ValueError(
                f"beta_fast must be greater than beta_slow, got beta_fast={self.beta_fast!r}, "
                f"beta_slow={self.beta_slow!r}"
            )
        if self.rope_type == "llama3":
            for name in ("low_freq_factor", "high_freq_factor"):
                value = getattr(self, name)
                if not _is_real(value) or not math.isfinite(value) or value <= 0:
                    raise ValueError(f"{name} must be a finite number > 0 for llama3, got {value!r}")
            if self.low_freq_factor >= self.high_freq_factor:
                raise ValueError(
                    f"low_freq_factor must be smaller than high_freq_factor for llama3, got "
                    f"low_freq_factor={self.low_freq_factor!r}, high_freq_factor={self.high_freq_factor!r}"
                )
        if self.attention_factor is not None:
            if self.rope_type not in _HAS_ATTENTION_FACTOR:
                raise ValueError(
                    f"attention_factor only applies to rope_type in {list(_HAS_ATTENTION_FACTOR)}, "
                    f"got it set ({self.attention_factor!r}) for {self.rope_type!r}"
                )
            af = self.attention_factor
            if not _is_real(af) or not math.isfinite(af) or af <= 0:
                raise ValueError(f"attention_factor must be a finite number > 0 or None, got {af!r}")


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- scalar helpers


def ntk_scaled_base(base: float, factor: float, head_dim: int) -> float:
    """PoSE's static NTK base: base * s^(d / (d - 2)). The HF export writes this as rope_theta."""
    if head_dim <= 2:
        raise ValueError(f"head_dim must be > 2 for ntk scaling, got {head_dim}")
    return base * factor ** (head_dim / (head_dim - 2))


def yarn_correction_range(
    head_dim: int,
    base: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> Tuple[int, int]:
    """The YaRN ramp bounds (low, high) in pair index i.

    Dimension pair i completes L_o / (2 pi base^(2i/d)) rotations over L_o tokens; `low` is where that
    count drops to beta_fast (floored), `high` where it drops to beta_slow (ceiled), clamped to [0, d-1].
    """

    def pair_index(rotations: float) -> float:
        return head_dim * math.log(original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(base)
        )

    low = math.floor(pair_index(beta_fast))
    high = math.ceil(pair_index(beta_slow))
    return max(low, 0), min(high, head_dim - 1)


def yarn_attention_factor(scaling: RopeScaling) -> float:
    """The YaRN attention factor (mscale): the override if set, else 0.1 ln(s) + 1 (1 for s <= 1)."""
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)
    if scaling.factor <= 1.0:
        return 1.0
    return 0.1 * math.log(scaling.factor) + 1.0


def _ramp_bounds(scaling: RopeScaling, head_dim: int, base: float) -> Tuple[float, float]:
    low, high = yarn_correction_range(
        head_dim, base, scaling.original_max_position_embeddings, scaling.beta_fast, scaling.beta_slow
    )
    # An empty ramp would divide by zero; widen it by a hair (same guard as transformers).
    return low, (high + 0.001 if high == low else high)


def yarn_revised_ext_factors(scaling: RopeScaling, head_dim: int, base: float) -> List[float]:
    """Per-pair wavelength multipliers of PoSE's revised YaRN: (1 - m_i) * s + m_i, m_i = 1 - ramp_i.

    1 for the fast (extrapolated) pairs, s for the slow (interpolated) ones. The HF export writes
    this list as longrope's short_factor and long_factor.
    """
    low, high = _ramp_bounds(scaling, head_dim, base)
    s = scaling.factor
    factors = []
    for i in range(head_dim // 2):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        m = 1.0 - ramp
        factors.append((1.0 - m) * s + m)
    return factors


# ----------------------------------------------------------------------------- scaling functions


def _base_powers(head_dim: int, base: float) -> torch.Tensor:
    """base^(2i/d) in float32, i = 0 .. d/2-1: int64 arange -> float32 -> divide -> pow, as HF does."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim  # [d/2]
    return base**exponents  # [d/2]


def _default(scaling: RopeScaling, head_dim: int, base: float) -> Tuple[torch.Tensor, float]:
    return 1.0 / _base_powers(head_dim, base), 1.0


def _linear(scaling: RopeScaling, head_dim: int, base: float) -> Tuple[torch.Tensor, float]:
    # Dividing the frequencies by s equals dividing the positions by s (position interpolation).
    return (1.0 / _base_powers(head_dim, base)) / scaling.factor, 1.0


def _ntk(scaling: RopeScaling, head_dim: int, base: float) -> Tuple[torch.Tensor, float]:
    return _default(scaling, head_dim, ntk_scaled_base(base, scaling.factor, head_dim))


def _yarn(scaling: RopeScaling, head_dim: int, base: float) -> Tuple[torch.Tensor, float]:
    # Blend of frequencies: theta_i * ((1 - m_i) / s + m_i).
    powers = _base_powers(head_dim, base)  # [d/2]
    extrapolated = 1.0 / powers
    interpolated = 1.0 / (scaling.factor * powers)
    low, high = _ramp_bounds(scaling, head_dim, base)
    pair = torch.arange(head_dim // 2, dtype=torch.float32, device="cpu")
    ramp = torch.clamp((pair - low) / (high - low), 0, 1)
    keep = 1 - ramp  # m_i: weight of the unscaled frequency
    inv_freq = interpolated * (1 - keep) + extrapolated * keep
    return inv_freq, yarn_attention_factor(scaling)


def _yarn_revised(scaling: RopeScaling, head_dim: int, base: float) -> Tuple[torch.Tensor, float]:
    # Blend of wavelengths: theta_i / ((1 - m_i) * s + m_i). Same arithmetic as HF longrope so that
    # the longrope export reproduces these frequencies bit for bit.
    ext = torch.tensor(yarn_revised_ext_factors(scaling, head_dim, base), dtype=torch.float32, device="cpu")
    return 1.0 / (ext * _base_powers(head_dim, base)), yarn_attention_factor(scaling)


def _llama3(scaling: RopeScaling, head_dim: int, base: float) -> Tuple[torch.Tensor, float]:
    inv_freq = 1.0 / _base_powers(head_dim, base)  # [d/2]
    s = scaling.factor
    context = scaling.original_max_position_embeddings
    long_wavelen = context / scaling.low_freq_factor  # longer than this: divide by s
    short_wavelen = context / scaling.high_freq_factor  # shorter than this: unchanged
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > long_wavelen, inv_freq / s, inv_freq)
    # In between, interpolate linearly in context / wavelength.
    smooth = (context / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s + smooth * scaled
    in_between = ~(wavelen < short_wavelen) * ~(wavelen > long_wavelen)
    return torch.where(in_between, smoothed, scaled), 1.0


ROPE_SCALING_FUNCTIONS: Dict[str, Callable[[RopeScaling, int, float], Tuple[torch.Tensor, float]]] = {
    "default": _default,
    "linear": _linear,
    "ntk": _ntk,
    "yarn": _yarn,
    "yarn-revised": _yarn_revised,
    "llama3": _llama3,
}


def compute_inv_freq(scaling: RopeScaling, head_dim: int, base: float) -> Tuple[torch.Tensor, float]:
    """Inverse frequencies (float32 [head_dim // 2]) and the attention factor for `scaling`.

    head_dim is the rotary dimension (head dim times rotary_percent); base is rope_theta.
    Always computed on CPU (even under a `torch.device` context): a GPU pow can differ by an ulp,
    and transformers computes its frequencies on the default device (CPU) in `_init_weights` and
    copies them into the buffer, so CPU is what an exported model reproduces.
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
    if not _is_real(base) or not math.isfinite(base) or base <= 1.0:
        raise ValueError(f"base (rope_theta) must be a finite number > 1, got {base!r}")
    scaling.validate()  # the dataclass is mutable; re-check what we are about to use
    inv_freq, attention_factor = ROPE_SCALING_FUNCTIONS[scaling.rope_type](scaling, head_dim, float(base))
    return inv_freq.to(torch.float32).contiguous(), float(attention_factor)


# ----------------------------------------------------------------------------- rotary module


class PoseRotaryEmbedding(torch.nn.Module):
    """Rotary angles for arbitrary (per-sample, non-contiguous) position ids, in megatron-core's layout.

    forward returns the angle tensor that megatron-core's `apply_rotary_pos_emb` consumes: float32,
    rotate-half (non-interleaved) layout cat((angles, angles), -1), shape [s, b, 1, d], or [s, 1, 1, d]
    when all samples share their positions (Transformer Engine's fused RoPE rejects a batch dim > 1).
    """

    def __init__(self, head_dim: int, base: float, scaling: RopeScaling, rotary_percent: float = 1.0):
        super().__init__()
        if not 0.0 < rotary_percent <= 1.0:
            raise ValueError(f"rotary_percent must be in (0, 1], got {rotary_percent!r}")
        rotary_dim = int(head_dim * rotary_percent)  # same rounding as megatron-core and HF
        inv_freq, attention_factor = compute_inv_freq(scaling, rotary_dim, base)
        self.rotary_dim = rotary_dim
        self.base = float(base)
        self.scaling = scaling
        # The attention factor is NOT folded into the angles: HF multiplies cos and sin by it, so the
        # logits scale by its square; the model applies attention_factor ** 2 as a softmax-scale
        # multiplier instead, which keeps this tensor pure angles (and megatron's mscale at 1, which
        # the fused RoPE kernel requires).
        self.attention_factor = attention_factor
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [d/2] fp32

    def _apply(self, fn, recurse=True):
        # Keep inv_freq float32 through .to(device) AND through dtype casts such as the
        # model.bfloat16() that megatron's Float16Module does: bf16 frequencies would ruin the angles.
        # A meta buffer (meta-device init followed by to_empty) has no values: recompute them.
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        if inv_freq.is_meta:
            inv_freq, _ = compute_inv_freq(self.scaling, self.rotary_dim, self.base)
        self.inv_freq = inv_freq.to(device=self.inv_freq.device, dtype=torch.float32)
        return self

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """position_ids: integer [b, s] -> angles float32 [s, b, 1, d] (or [s, 1, 1, d], see class doc)."""
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be [b, s], got shape {tuple(position_ids.shape)}")
        position_ids = position_ids.to(self.inv_freq.device)
        # Data-dependent output shape, so this comparison syncs with the device once per call.
        if position_ids.size(0) > 1 and torch.equal(position_ids, position_ids[:1].expand_as(position_ids)):
            position_ids = position_ids[:1]  # shared positions: [1, s]
        # One fp32 multiply per angle, the same arithmetic as HF's rotary forward (bitwise equal).
        angles = position_ids.t()[..., None].float() * self.inv_freq  # [s, b, d/2]
        emb = torch.cat((angles, angles), dim=-1)  # [s, b, d]
        return emb[:, :, None, :]  # [s, b, 1, d]

    def extra_repr(self) -> str:
        return (
            f"rotary_dim={self.rotary_dim}, rope_type={self.scaling.rope_type!r}, "
            f"factor={self.scaling.factor}, attention_factor={self.attention_factor:.6f}"
        )
