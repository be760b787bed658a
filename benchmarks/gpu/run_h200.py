#!/usr/bin/env python3
"""The prepared GPU check for one H200: four sections, each under its own time cap, each writing
its JSON as it finishes (docs/gpu.md says what each measures and how to run it).

    python benchmarks/gpu/run_h200.py --out "$OUT" --megatron-core-wheel PATH.whl
    python benchmarks/gpu/run_h200.py --dry-run --out /tmp/gpu-dry   # CPU, tiny sizes, seconds

Self-contained: it installs nothing. pose_megatron comes from this working tree; megatron-core from
a wheel (`--megatron-core-wheel`, unpacked into a temporary folder and put on the path) or from
PYTHONPATH / the environment. Sections: correctness, step_time, long_context, evaluation
(`--sections` picks some, `--cap NAME=SECONDS` changes a cap, `--budget` bounds the whole run).
Results: OUT/<section>.json, OUT/summary.json, OUT/children.log (six files: the device tool
returns at most eight).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# pose_megatron (the working tree), benchmarks/ (common, bench_eval), tests/ (tiny_models), here.
IMPORT_PATHS = [str(REPO), str(REPO / "benchmarks"), str(REPO / "tests"), str(HERE)]
sys.path[:0] = [p for p in IMPORT_PATHS if p not in sys.path]

from sizes import MODES, SECTIONS  # noqa: E402  (light: pose_megatron.presets only)
from supervisor import Supervisor, SupervisorConfig, write_json  # noqa: E402


class CheckError(SystemExit):
    """A problem with how the check was started: one line naming it and the fix."""

    def __init__(self, message: str):
        super().__init__(f"run_h200.py: {message}")


def unpack_megatron_core(wheel: str) -> str:
    """Unpack a megatron-core wheel (a zip) into a temporary folder; returns the folder for sys.path.

    Unpacking rather than importing from the zip: its dataset helper is a compiled extension, which
    Python cannot load from inside an archive. The wheel must match this interpreter (cp312 for
    Python 3.12): the helper is built per Python version.
    """
    path = Path(wheel)
    if not path.is_file() or path.suffix != ".whl":
        raise CheckError(f"--megatron-core-wheel {wheel}: no such .whl file; carry the cp3XX wheel "
                         "of megatron-core and pass its path")
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    if not path.name.startswith("megatron_core-") or f"-{tag}-" not in path.name:
        raise CheckError(f"{path.name} is not a megatron-core wheel for this Python ({tag}); "
                         f"download one with: pip download megatron-core==X --no-deps "
                         f"--python-version {sys.version_info.major}.{sys.version_info.minor} "
                         "--only-binary :all:")
    target = tempfile.mkdtemp(prefix="megatron-core-")
    with zipfile.ZipFile(path) as archive:
        archive.extractall(target)
    return target


def megatron_core_location(args) -> str:
    """The folder to put first on the children's path ('' when megatron-core is importable as is)."""
    if args.megatron_core_wheel:
        return unpack_megatron_core(args.megatron_core_wheel)
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        raise CheckError("megatron-core is not importable: pass --megatron-core-wheel PATH (the "
                         f"wheel for cp{sys.version_info.major}{sys.version_info.minor}) or put "
                         "an unpacked megatron-core on PYTHONPATH")
    return ""


def parse_caps(items, defaults) -> dict:
    caps = dict(defaults)
    for item in items or []:
        name, _, seconds = item.partition("=")
        if name not in caps or not seconds:
            raise CheckError(f"--cap {item!r}: use NAME=SECONDS with NAME one of {', '.join(SECTIONS)}")
        try:
            caps[name] = float(seconds)
        except ValueError:
            raise CheckError(f"--cap {item!r}: {seconds!r} is not a number of seconds") from None
    return caps


def parse_sections(text: str) -> list:
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise CheckError(f"--sections {text!r}: choose from {', '.join(SECTIONS)} (comma-separated)")
    return sorted(set(names), key=SECTIONS.index)  # always in the check's order


def environment_record() -> dict:
    """Versions and device, stored with every section's result (transformers by its metadata, so
    sections that do not need it never import it)."""
    from importlib import metadata

    import megatron.core
    import torch

    import common

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "device": common.describe_device(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": version("transformers"),
        "megatron_core": version("megatron-core"),
        "megatron_core_path": os.path.dirname(megatron.core.__file__),
        "transformer_engine": importlib.util.find_spec("transformer_engine") is not None,
    }


def run_child(args) -> None:
    """Run the sections in this process, in order, one JSON each (the supervisor watches)."""
    from pose_megatron._compat import enable_cpu_fallbacks

    enable_cpu_fallbacks()  # on CPU (the dry-run) only; with CUDA nothing is applied
    import torch

    import long_sections
    import model_sections
    from pose_megatron import runtime

    if args.mode == "h200" and not torch.cuda.is_available():
        raise CheckError("no CUDA device here: run on the GPU machine, or pass --dry-run on CPU")
    run = {"correctness": model_sections.correctness, "step_time": model_sections.step_time,
           "long_context": long_sections.long_context, "evaluation": long_sections.evaluation}
    sizes = MODES[args.mode]
    env = environment_record()
    out = Path(args.out)
    for name in parse_sections(args.sections):
        write_json(Path(args.running_file), {"section": name, "started": time.time()})
        started = time.perf_counter()
        try:
            record = {"status": "ok", **run[name](sizes)}
        except Exception as error:  # one section's failure is its own record; the next still runs
            record = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                      "traceback": traceback.format_exc()[-3000:]}
            runtime.destroy()
        record.update(section=name, mode=args.mode, seconds=time.perf_counter() - started,
                      environment=env)
        write_json(out / f"{name}.json", record)
        gc.collect()  # the section's models are unreachable now; give their memory back
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-check"),
                        help="results folder (default: $OUT, else ./gpu-check)")
    parser.add_argument("--megatron-core-wheel", help="megatron-core wheel for this Python to run with")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: proves the code path")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--cap", action="append", metavar="NAME=SECONDS", help="a section's time cap")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run (default: the caps' sum plus 30)")
    parser.add_argument("--start-timeout", type=float, default=180.0,
                        help="seconds a child may take to import and start its first section")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=sorted(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--running-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        # Every result is on disk (atomic writes) and each section tore down its own state, so the
        # child skips the interpreter's shutdown: with torch, megatron-core and transformers loaded
        # (about half a million objects) its module teardown garbage-collects for seconds.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    mode = "dry-run" if args.dry_run else "h200"
    if mode == "h200":
        import torch  # only here: the supervisor itself needs no torch

        if not torch.cuda.is_available():  # fail in seconds, not after the child's imports
            raise CheckError("no CUDA device here: run on the GPU machine, or pass --dry-run on CPU")
    sections = parse_sections(args.sections)
    caps = parse_caps(args.cap, MODES[mode].caps)
    extra_path = megatron_core_location(args)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [p for p in [extra_path, *IMPORT_PATHS, env.get("PYTHONPATH", "")] if p])
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry-run is the CPU path, even on a GPU host
    budget = args.budget if args.budget is not None else sum(caps[n] for n in sections) + 30.0
    out = Path(args.out)
    running_file = Path(tempfile.mkdtemp(prefix="gpu-check-")) / "running.json"
    config = SupervisorConfig(
        out_dir=out, caps=caps, budget=budget, start_timeout=args.start_timeout, env=env,
        running_file=running_file,
        child_command=[sys.executable, str(Path(__file__).resolve()), "--child", "--mode", mode,
                       "--out", str(out), "--running-file", str(running_file)],
    )
    print(f"[gpu-check] {mode}: {', '.join(sections)}; caps {caps}; budget {budget:.0f} s; "
          f"results in {out}", flush=True)
    try:
        status = Supervisor(config, sections).run()
    finally:  # the unpacked wheel and the running file are this run's alone
        shutil.rmtree(running_file.parent, ignore_errors=True)
        if extra_path:
            shutil.rmtree(extra_path, ignore_errors=True)
    print(json.dumps(status), flush=True)
    sys.exit(0 if all(s == "ok" for s in status.values()) else 1)


if __name__ == "__main__":
    main()
