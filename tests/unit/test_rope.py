"""RoPE scaling maths against the reference values (docs/reference.md, "RoPE scaling") and the rotary module."""

import math

import pytest
import torch

from pose_megatron.rope import (
    ROPE_SCALING_FUNCTIONS,
    ROPE_TYPES,
    PoseRotaryEmbedding,
    RopeScaling,
    compute_inv_freq,
    ntk_scaled_base,
    yarn_attention_factor,
    yarn_correction_range,
    yarn_revised_ext_factors,
)

D, BASE = 128, 10000.0


def _theta64(head_dim=D, base=BASE):
    return base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def _inv(rope_type, factor=1.0, omax=None, head_dim=D, base=BASE, **kw):
    return compute_inv_freq(
        RopeScaling(rope_type=rope_type, factor=factor, original_max_position_embeddings=omax, **kw), head_dim, base
    )


def test_registry_covers_every_type():
    assert set(ROPE_SCALING_FUNCTIONS) == set(ROPE_TYPES)


@pytest.mark.parametrize("factor, expected", [(4, 40890), (8, 82685), (16, 167199), (48, 510420), (64, 683675)])
def test_ntk_scaled_base_reference_values(factor, expected):
    assert round(ntk_scaled_base(BASE, factor, D)) == expected


def test_ntk_is_default_with_scaled_base():
    ntk, af = _inv("ntk", 16.0)
    default_scaled, _ = _inv("default", base=ntk_scaled_base(BASE, 16.0, D))
    assert af == 1.0
    assert torch.equal(ntk, default_scaled)
    # Highest frequency untouched, lowest divided by exactly s (base^(-(d-2)/d) * s^(-1)).
    assert ntk[0].item() == 1.0
    torch.testing.assert_close(ntk[-1].double(), _theta64()[-1] / 16.0, rtol=1e-6, atol=0)


def test_default_and_linear_match_formula():
    default, af_d = _inv("default")
    linear, af_l = _inv("linear", 4.0)
    assert default.dtype == torch.float32 and default.shape == (D // 2,)
    torch.testing.assert_close(default.double(), _theta64(), rtol=1e-6, atol=0)
    torch.testing.assert_close(linear.double(), _theta64() / 4.0, rtol=1e-6, atol=0)
    assert af_d == af_l == 1.0


@pytest.mark.parametrize("omax, expected", [(2048, (16, 41)), (4096, (20, 46))])
def test_yarn_correction_range_reference_values(omax, expected):
    assert yarn_correction_range(D, BASE, omax, 32.0, 1.0) == expected


def test_yarn_correction_range_is_clamped():
    # Huge L_o pushes `high` past the last pair; tiny L_o pushes `low` below 0.
    assert yarn_correction_range(D, BASE, 10**9)[1] == D - 1
    assert yarn_correction_range(D, BASE, 16)[0] == 0


@pytest.mark.parametrize(
    "i, revised, yarn", [(20, 0.4717, 0.8600), (28, 0.2294, 0.5800), (35, 0.1582, 0.3350)]
)
def test_yarn_vs_revised_ratios_in_ramp(i, revised, yarn):
    theta = _theta64()
    y, _ = _inv("yarn", 8.0, 2048)
    r, _ = _inv("yarn-revised", 8.0, 2048)
    assert y[i].item() / theta[i].item() == pytest.approx(yarn, abs=6e-5)
    assert r[i].item() / theta[i].item() == pytest.approx(revised, abs=6e-5)


def test_yarn_and_revised_tail_and_head():
    theta = _theta64()
    for rope_type in ("yarn", "yarn-revised"):
        inv, _ = _inv(rope_type, 8.0, 2048)
        ratio = inv.double() / theta
        torch.testing.assert_close(ratio[41:], torch.full_like(ratio[41:], 1 / 8), rtol=1e-6, atol=0)
        torch.testing.assert_close(ratio[:17], torch.ones_like(ratio[:17]), rtol=1e-6, atol=0)


def test_revised_equals_yarn_outside_ramp_and_is_lower_inside():
    low, high = yarn_correction_range(D, BASE, 2048)
    y, _ = _inv("yarn", 8.0, 2048)
    r, _ = _inv("yarn-revised", 8.0, 2048)
    assert torch.equal(r[: low + 1], y[: low + 1])
    assert torch.equal(r[high:], y[high:])
    assert bool((r[low + 1 : high] < y[low + 1 : high]).all())


def test_yarn_attention_factor():
    _, af = _inv("yarn", 8.0, 2048)
    _, af_rev = _inv("yarn-revised", 8.0, 2048)
    assert af == pytest.approx(1.20794, abs=5e-6)
    assert af_rev == af == 0.1 * math.log(8.0) + 1
    assert yarn_attention_factor(RopeScaling("yarn", 1.0, 2048)) == 1.0
    _, override = _inv("yarn-revised", 8.0, 2048, attention_factor=1.5)
    assert override == 1.5


def test_revised_ext_factors():
    ext = yarn_revised_ext_factors(RopeScaling("yarn-revised", 8.0, 2048), D, BASE)
    assert len(ext) == D // 2
    assert ext[:17] == [1.0] * 17 and ext[41:] == [8.0] * (D // 2 - 41)
    assert ext[20] == pytest.approx(0.16 * 8 + 0.84, abs=1e-12)
    assert all(a <= b for a, b in zip(ext, ext[1:]))
    r, _ = _inv("yarn-revised", 8.0, 2048)
    torch.testing.assert_close(r.double(), _theta64() / torch.tensor(ext, dtype=torch.float64), rtol=1e-6, atol=0)


def test_llama3_bands():
    omax, s = 8192, 8.0
    inv, af = _inv("llama3", s, omax, base=500000.0, low_freq_factor=1.0, high_freq_factor=4.0)
    theta = _theta64(base=500000.0)
    wavelen = 2 * math.pi / theta
    high_band = wavelen < omax / 4.0
    low_band = wavelen > omax / 1.0
    mid = ~high_band & ~low_band
    assert af == 1.0 and high_band.any() and low_band.any() and mid.any()
    ratio = inv.double() / theta
    torch.testing.assert_close(ratio[high_band], torch.ones_like(ratio[high_band]), rtol=1e-6, atol=0)
    torch.testing.assert_close(ratio[low_band], torch.full_like(ratio[low_band], 1 / s), rtol=1e-6, atol=0)
    smooth = (omax / wavelen[mid] - 1.0) / (4.0 - 1.0)
    torch.testing.assert_close(ratio[mid], (1 - smooth) / s + smooth, rtol=1e-5, atol=0)
    # The band edges move with the configurable factors.
    inv_wide, _ = _inv("llama3", s, omax, base=500000.0, low_freq_factor=0.5, high_freq_factor=8.0)
    assert not torch.equal(inv, inv_wide)


# ----------------------------------------------------------------------------- validation


_YARN = dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=2048)
_LLAMA3 = dict(rope_type="llama3", factor=8.0, original_max_position_embeddings=8192)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(rope_type="dynamic"), "rope_type"),
        (dict(rope_type="linear", factor=0.5), "factor"),
        (dict(rope_type="linear", factor=float("inf")), "factor"),
        (dict(rope_type="default", factor=2.0), "factor"),
        (dict(rope_type="yarn", factor=8.0), "original_max_position_embeddings"),
        (dict(rope_type="yarn-revised", factor=8.0), "original_max_position_embeddings"),
        (dict(rope_type="llama3", factor=8.0), "original_max_position_embeddings"),
        ({**_YARN, "original_max_position_embeddings": 0}, "original_max_position_embeddings"),
        ({**_YARN, "original_max_position_embeddings": 2048.5}, "original_max_position_embeddings"),
        ({**_YARN, "beta_fast": 1.0, "beta_slow": 1.0}, "beta_fast"),
        ({**_YARN, "beta_slow": 0.0}, "beta_slow"),
        ({**_LLAMA3, "low_freq_factor": 4.0, "high_freq_factor": 4.0}, "low_freq_factor"),
        ({**_LLAMA3, "low_freq_factor": -1.0}, "low_freq_factor"),
        (dict(rope_type="linear", factor=2.0, attention_factor=1.1), "attention_factor"),
        ({**_YARN, "attention_factor": 0.0}, "attention_factor"),
    ],
)
def test_validation_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RopeScaling(**kwargs)


def test_validation_accepts_good_configs_and_rechecks_on_compute():
    for rope_type in ROPE_TYPES:
        factor = 1.0 if rope_type == "default" else 4.0
        scaling = RopeScaling(rope_type=rope_type, factor=factor, original_max_position_embeddings=4096)
        inv, _ = compute_inv_freq(scaling, 64, BASE)
        assert inv.shape == (32,) and bool(torch.isfinite(inv).all())
    scaling = RopeScaling("linear", 2.0)
    scaling.factor = 0.5  # mutated after construction
    with pytest.raises(ValueError, match="factor"):
        compute_inv_freq(scaling, 64, BASE)


@pytest.mark.parametrize("head_dim", [0, -4, 7, 127])
def test_compute_rejects_bad_head_dim(head_dim):
    with pytest.raises(ValueError, match="head_dim"):
        compute_inv_freq(RopeScaling(), head_dim, BASE)


# ----------------------------------------------------------------------------- rotary module


def _module(rope_type="yarn-revised", factor=8.0, head_dim=D, **kw):
    return PoseRotaryEmbedding(head_dim, BASE, RopeScaling(rope_type, factor, 2048), **kw)


def test_module_per_sample_positions_shape_and_values():
    module = _module()
    pos = torch.tensor([[0, 1, 2, 9000, 9001], [0, 1, 15000, 15001, 16383]])
    freqs = module(pos)
    assert freqs.shape == (5, 2, 1, D) and freqs.dtype == torch.float32
    inv, af = _inv("yarn-revised", 8.0, 2048)
    expected = pos.float()[..., None] * inv  # [b, s, d/2], one fp32 multiply per angle
    for b in range(2):
        assert torch.equal(freqs[:, b, 0, : D // 2], expected[b])
        assert torch.equal(freqs[:, b, 0, D // 2 :], expected[b])  # rotate-half layout: halves repeat
    assert module.attention_factor == af


def test_module_collapses_shared_positions():
    module = _module("linear", 4.0)
    row = torch.tensor([0, 1, 2, 3000, 3001, 3002])
    shared = module(row.expand(3, -1).clone())
    single = module(row[None])
    assert shared.shape == single.shape == (6, 1, 1, D)
    assert torch.equal(shared, single)
    assert torch.equal(single[:, 0, 0, : D // 2], row.float()[:, None] * module.inv_freq)


def test_module_rotary_percent_and_buffer_handling():
    module = _module("default", 1.0, rotary_percent=0.5)
    assert module.rotary_dim == D // 2
    assert torch.equal(module.inv_freq, _inv("default", head_dim=D // 2)[0])
    assert module(torch.tensor([[0, 3]])).shape == (2, 1, 1, D // 2)
    assert "inv_freq" not in module.state_dict()  # non-persistent: recomputed, never checkpointed
    reference = module.inv_freq.clone()
    module.bfloat16()  # what megatron's Float16Module does to the whole model
    assert module.inv_freq.dtype == torch.float32 and torch.equal(module.inv_freq, reference)
    with pytest.raises(ValueError, match="rotary_percent"):
        _module(rotary_percent=0.0)
    with pytest.raises(ValueError, match="position_ids"):
        module(torch.tensor([0, 1, 2]))


def test_module_survives_meta_device_init():
    reference = _module("ntk", 8.0).inv_freq
    with torch.device("meta"):  # frequencies are computed on CPU even here
        built_on_meta = _module("ntk", 8.0)
    assert torch.equal(built_on_meta.inv_freq, reference)
    moved = _module("ntk", 8.0).to("meta")
    assert moved.inv_freq.is_meta
    moved.to_empty(device="cpu")  # megatron's meta-init path: values are recomputed, not left empty
    assert torch.equal(moved.inv_freq, reference)
