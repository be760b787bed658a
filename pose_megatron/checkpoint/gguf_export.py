"""Hugging Face export -> GGUF for llama.cpp: the user's converter, then the RoPE it drops.

`export_gguf` checks first that llama.cpp can run the model (gguf_rope.plan_gguf_rope; refused with
the reason otherwise), runs the user's own `convert_hf_to_gguf.py` (from their llama.cpp checkout) on
the HF directory, and rewrites the converter's GGUF with the `gguf` package (llama.cpp's own reader
and writer): the RoPE keys and factor tensors become exactly the plan (`rewrite_gguf`), and a
Baichuan2 NormHead's `output` rows are normalised, which the converter does not do. Every other key
and tensor is copied unchanged, raw bytes included (quantised tensors too). Key and tensor names
come from the gguf package's constants. The output appears only when complete (files.atomic_file).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import gguf
import numpy as np

from pose_megatron.checkpoint.errors import ConversionError
from pose_megatron.checkpoint.gguf_rope import GGUFRope, gguf_architecture, plan_gguf_rope
from pose_megatron.checkpoint.hf_arch import HFModelInfo, model_info_from_hf_config, read_hf_config
from pose_megatron.files import atomic_file, is_writable, temporary_sibling

CONVERTER = "convert_hf_to_gguf.py"
"""The converter's file name in a llama.cpp checkout."""
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
"""Converter --outtype values this tool passes on."""
_NORMALISABLE = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # what the converter can build a vocab from
_WEIGHT = ".weight"  # GGUF tensor names are gguf.TENSOR_NAMES[...] plus this suffix
_HEADER_FIELDS = "GGUF."  # GGUFReader's names for the file header (version, counts): not metadata

Value = Tuple[object, gguf.GGUFValueType]
_BAICHUAN_RECURSION = (  # docs/reference.md, "Serving engines" (measured with llama.cpp 0c1e570)
    "this llama.cpp's Baichuan converter calls its own modify_tensors for every tensor but W_pack "
    "and never ends (a bug in conversion/baichuan.py); run an earlier llama.cpp's converter (the "
    "early-2025 one converts Baichuan) with --llama-cpp. ")


@dataclass
class GGUFExportPlan:
    """What the GGUF step will write, decided (and refused) before any work."""

    info: HFModelInfo
    """The HF directory's config.json in pose_megatron's terms."""
    arch: str
    """The llama.cpp architecture name (`general.architecture`)."""
    rope: GGUFRope
    """The RoPE metadata llama.cpp needs."""
    normalise_output: bool
    """Normalise each vocabulary row of `output.weight` (Baichuan2's NormHead)."""


def plan_gguf_export(hf_dir: Union[str, Path], outtype: str = "f32") -> GGUFExportPlan:
    """Read and check an HF directory for the GGUF step; ConversionError names what is wrong."""
    hf_dir = Path(hf_dir)
    info = model_info_from_hf_config(read_hf_config(hf_dir))
    if outtype not in OUTTYPES:
        raise ConversionError(f"outtype {outtype!r} is not one of {list(OUTTYPES)}")
    if info.model.norm_head and outtype not in ("f32", "f16"):
        raise ConversionError(
            f"{info.family.title}'s NormHead output layer is normalised in the GGUF, which needs "
            f"float rows: use outtype f32 or f16 (not {outtype}), then quantise with llama-quantize")
    if not any((hf_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise ConversionError(f"{hf_dir} has no {' or '.join(_TOKENIZER_FILES)}; llama.cpp's converter "
                              "needs the tokenizer: export with --tokenizer-dir")
    arch = gguf.MODEL_ARCH_NAMES[gguf_architecture(info)]
    return GGUFExportPlan(info, arch, plan_gguf_rope(info), info.model.norm_head)


def run_converter(converter: Path, hf_dir: Path, outfile: Path, outtype: str,
                  python: Optional[str] = None, quiet: bool = False) -> str:
    """Run llama.cpp's converter; its log (when quiet) or "" ; ConversionError when it fails."""
    command = [python or sys.executable, str(converter), str(hf_dir), "--outtype", outtype,
               "--outfile", str(outfile)]
    done = subprocess.run(command, capture_output=quiet, text=True)
    log = (done.stdout or "") + (done.stderr or "")
    if done.returncode != 0:
        shown = f"; its output ends:\n{log[-3000:]}" if quiet else " (its output is above)"
        raise ConversionError(f"llama.cpp's converter failed with exit status {done.returncode}: "
                              f"{' '.join(command)}{shown}")
    if not outfile.is_file():
        raise ConversionError(f"llama.cpp's converter wrote no {outfile}")
    return log


def rope_values(rope: GGUFRope, arch: str) -> Dict[str, Value]:
    """The GGUF keys (with their values and types) that say `rope`."""
    keys, types = gguf.Keys.Rope, gguf.GGUFValueType
    values = {keys.FREQ_BASE: (rope.freq_base, types.FLOAT32)}
    if rope.scaling_type is not None:
        values[keys.SCALING_TYPE] = (rope.scaling_type, types.STRING)
    if rope.factor is not None:
        values[keys.SCALING_FACTOR] = (rope.factor, types.FLOAT32)
    if rope.original_context_length is not None:
        values[keys.SCALING_ORIG_CTX_LEN] = (rope.original_context_length, types.UINT32)
    if rope.attn_factor is not None:
        values[keys.SCALING_ATTN_FACTOR] = (rope.attn_factor, types.FLOAT32)
    return {key.format(arch=arch): value for key, value in values.items()}


def owned_rope_keys(arch: str) -> List[str]:
    """Every key the RoPE plan decides: the base and all `rope.scaling.*` keys (others it removes)."""
    keys = gguf.Keys.Rope
    names = [keys.FREQ_BASE] + [getattr(keys, a) for a in dir(keys) if a.startswith("SCALING_")]
    return sorted(name.format(arch=arch) for name in names)


def factor_tensors(rope: GGUFRope) -> Dict[str, np.ndarray]:
    """The per-frequency factor tensors (float32 [d/2]) that say `rope`."""
    if rope.freq_factors is None:
        return {}
    data = np.asarray(rope.freq_factors, dtype=np.float32)  # [d/2]
    names = ([gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT]
             if rope.scaling_type == gguf.RopeScalingType.LONGROPE.value else [gguf.MODEL_TENSOR.ROPE_FREQS])
    return {gguf.TENSOR_NAMES[name] + _WEIGHT: data for name in names}


def owned_tensor_names() -> List[str]:
    kinds = (gguf.MODEL_TENSOR.ROPE_FREQS, gguf.MODEL_TENSOR.ROPE_FACTORS_LONG,
             gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)
    return [gguf.TENSOR_NAMES[kind] + _WEIGHT for kind in kinds]


def _normalised_rows(tensor) -> np.ndarray:
    """Each vocabulary row of an output weight ([vocab, hidden] in numpy order) at unit L2 norm."""
    if tensor.tensor_type not in _NORMALISABLE:
        raise ConversionError(f"{tensor.name} is {tensor.tensor_type.name}; NormHead rows can only be "
                              "normalised in F32 or F16")
    rows = np.asarray(tensor.data, dtype=np.float64)  # [vocab, hidden]
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return (rows / np.maximum(norms, 1e-12)).astype(tensor.data.dtype)  # F.normalize's epsilon


def _copy_field(writer: gguf.GGUFWriter, field) -> None:
    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY and len(field.types) > 2:
        raise ConversionError(f"GGUF key {field.name} is a nested array, which this copy does not support")
    sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
    writer.add_key_value(field.name, field.contents(), kind, sub_type=sub_type)


def rewrite_gguf(src: Union[str, Path], dst: Union[str, Path], rope: GGUFRope, *,
                 arch: Optional[str] = None, normalise_output: bool = False) -> List[str]:
    """Copy the GGUF `src` to `dst` with its RoPE keys and factor tensors replaced by `rope` (and
    `output.weight` normalised row by row if asked). Returns what changed, one line each.

    `arch`, when given, is the architecture `src` must have (a converter that wrote another one
    converted some other model)."""
    reader = gguf.GGUFReader(str(src))
    found_arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    if arch is not None and found_arch != arch:
        raise ConversionError(f"{src} is a {found_arch!r} GGUF, expected {arch!r}")
    writer = gguf.GGUFWriter(str(dst), found_arch, endianess=reader.endianess)
    alignment = reader.fields.get(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:  # tensor data offsets follow it: keep the source's
        writer.data_alignment = int(alignment.contents())
    owned, new_values = set(owned_rope_keys(found_arch)), rope_values(rope, found_arch)
    changes = []
    for field in reader.fields.values():
        if field.name.startswith(_HEADER_FIELDS) or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        if field.name in owned:
            old = field.contents()
            if field.name not in new_values:
                changes.append(f"removed {field.name} (was {old!r})")
            elif not _same_value(old, new_values[field.name]):
                changes.append(f"{field.name}: {old!r} -> {new_values[field.name][0]!r}")
            continue
        _copy_field(writer, field)
    for name, (value, kind) in new_values.items():
        if name not in reader.fields:
            changes.append(f"added {name} = {value!r}")
        writer.add_key_value(name, value, kind)

    output = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + _WEIGHT
    dropped, added = set(owned_tensor_names()), factor_tensors(rope)
    tensors = [t for t in reader.tensors if t.name not in dropped]
    data = {t.name: t.data for t in tensors}
    if normalise_output:
        source = next((t for t in tensors if t.name == output), None)
        if source is None:
            raise ConversionError(f"{src} has no {output} tensor to normalise (NormHead)")
        data[output] = _normalised_rows(source)
        changes.append(f"normalised each row of {output} (NormHead)")
    changes += _tensor_changes([t for t in reader.tensors if t.name in dropped], added)
    for t in tensors:
        writer.add_tensor_info(t.name, data[t.name].shape, data[t.name].dtype, data[t.name].nbytes,
                               t.tensor_type)
    for name, array in added.items():
        writer.add_tensor_info(name, array.shape, array.dtype, array.nbytes, gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(data[t.name], tensor_endianess=reader.endianess)
    for array in added.values():
        writer.write_tensor_data(array)
    writer.close()
    return changes


def _tensor_changes(replaced, added: Dict[str, np.ndarray]) -> List[str]:
    """One line per factor tensor the rewrite removed, changed or added."""
    changes, before = [], {t.name: np.asarray(t.data, dtype=np.float64).reshape(-1) for t in replaced}
    for name, old in before.items():
        new = added.get(name)
        if new is None:
            changes.append(f"removed tensor {name}")
        elif old.shape != new.shape or not np.array_equal(old, new):
            change = np.max(np.abs(old - new) / np.abs(new)) if old.shape == new.shape else float("nan")
            changes.append(f"replaced tensor {name} (largest relative change {change:.3g})")
    changes += [f"added tensor {name} {list(a.shape)}" for name, a in added.items() if name not in before]
    return changes


def _same_value(old, new: Value) -> bool:
    value, kind = new
    if kind == gguf.GGUFValueType.FLOAT32:  # stored as float32: compare at that precision
        return np.float32(old) == np.float32(value)
    return old == value


def export_gguf(hf_dir: Union[str, Path], outfile: Union[str, Path], llama_cpp_dir: Union[str, Path], *,
                outtype: str = "f32", python: Optional[str] = None, overwrite: bool = False,
                quiet: bool = False) -> Tuple[Path, GGUFExportPlan, List[str]]:
    """HF directory -> GGUF `outfile` that llama.cpp runs with the trained RoPE.

    Runs `llama_cpp_dir`/convert_hf_to_gguf.py under `python` (default: this interpreter), then
    `rewrite_gguf` with the plan. Returns (outfile, the plan, what the rewrite changed)."""
    hf_dir, outfile = Path(hf_dir), Path(outfile)
    plan = plan_gguf_export(hf_dir, outtype)
    converter = Path(llama_cpp_dir) / CONVERTER
    if not converter.is_file():
        raise ConversionError(f"{converter} not found: --llama-cpp must be a llama.cpp checkout (the "
                              f"directory that holds {CONVERTER})")
    if outfile.exists() and not overwrite:
        raise ConversionError(f"{outfile} exists; pass --overwrite to replace it, or choose another --outfile")
    if not is_writable(outfile.parent):
        raise ConversionError(f"{outfile.parent} is not writable; choose another --outfile")
    outfile.parent.mkdir(parents=True, exist_ok=True)
    raw = temporary_sibling(outfile, ".converter")
    try:
        try:
            run_converter(converter, hf_dir, raw, outtype, python, quiet)
        except ConversionError as failure:
            if plan.arch == gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BAICHUAN] and "RecursionError" in str(failure):
                raise ConversionError(_BAICHUAN_RECURSION + str(failure)) from None
            raise
        with atomic_file(outfile) as tmp:
            changes = rewrite_gguf(raw, tmp, plan.rope, arch=plan.arch,
                                   normalise_output=plan.normalise_output)
    finally:
        raw.unlink(missing_ok=True)
    return outfile, plan, changes
