"""Command-line pieces shared by tools/eval_perplexity.py, tools/eval_passkey.py and
tools/eval_far_tokens.py: the common flags, the tokenizer, and the one per-checkpoint loop.

Checkpoints are given in order, mixing kinds: `--load DIR` (pose_megatron / Megatron checkpoint) and
`--hf-dir DIR` (Hugging Face directory), each optionally followed by its own `--label NAME`. A tool
prepares its inputs (data, prompts) first, so bad input fails before any model is loaded, then hands
`evaluate_checkpoints` the function that evaluates one open backend.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch

from pose_megatron import runtime
from pose_megatron._compat import enable_cpu_fallbacks
from pose_megatron.checkpoint.layout import holds_checkpoint, why_no_checkpoint
from pose_megatron.evaluation.backend import EvalBackend, default_label, open_backend
from pose_megatron.files import is_writable

logger = logging.getLogger("pose_megatron.evaluation")

Result = TypeVar("Result")


@dataclass
class CheckpointSpec:
    """One checkpoint to evaluate, as the command line named it."""

    kind: str
    """"megatron" (--load) or "hf" (--hf-dir): the backend's registered name."""
    path: str
    """The checkpoint directory."""
    label: Optional[str] = None
    """Its name in tables, plots and JSON (--label; default: its directory name)."""


class _AddCheckpoint(argparse.Action):
    """Appends a CheckpointSpec of this flag's kind, so --load and --hf-dir keep their order."""

    def __call__(self, parser, namespace, value, option_string=None):
        specs = getattr(namespace, "checkpoints", None) or []
        specs.append(CheckpointSpec(kind=self.const, path=value))
        namespace.checkpoints = specs


class _AddLabel(argparse.Action):
    """--label names the checkpoint given just before it."""

    def __call__(self, parser, namespace, value, option_string=None):
        specs = getattr(namespace, "checkpoints", None) or []
        if not specs:
            parser.error("--label must follow the --load or --hf-dir it names")
        if specs[-1].label is not None:
            parser.error(f"--label {value!r}: {specs[-1].path} already has label {specs[-1].label!r}")
        specs[-1].label = value


def parse_lengths(text: str) -> List[int]:
    """"2048,4096,16k" -> [2048, 4096, 16384] (k = 1024), sorted, without duplicates."""
    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            value = int(part[:-1]) * 1024 if part[-1] in "kK" else int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a length (e.g. 2048 or 2k)") from None
        if value < 2:
            raise argparse.ArgumentTypeError(f"lengths must be >= 2 tokens, got {value}")
        out.append(value)
    if not out:
        raise argparse.ArgumentTypeError("give at least one length")
    return sorted(set(out))


def parse_depths(text: str) -> List[float]:
    try:
        depths = [float(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: depths are fractions, e.g. 0,0.25,0.5,0.75,1") from None
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise argparse.ArgumentTypeError(f"depths must be in [0, 1], got {text!r}")
    return sorted(set(depths))


def add_common_arguments(parser: argparse.ArgumentParser, with_lengths: bool = True) -> None:
    """The flags every evaluation tool takes; `with_lengths` adds the required --lengths (tools
    that score a fixed range, like the far-token tool, have no lengths)."""
    group = parser.add_argument_group("checkpoints (repeatable, evaluated in order)")
    group.add_argument("--load", action=_AddCheckpoint, const="megatron", metavar="DIR",
                       help="a pose_megatron checkpoint: a --save root or one of its iter_* directories")
    group.add_argument("--hf-dir", action=_AddCheckpoint, const="hf", metavar="DIR",
                       help="a Hugging Face model directory (transformers AutoModelForCausalLM)")
    group.add_argument("--label", action=_AddLabel, metavar="NAME",
                       help="name of the checkpoint given just before (default: its directory name)")
    if with_lengths:
        parser.add_argument("--lengths", type=parse_lengths, required=True,
                            help="comma-separated token lengths, e.g. 2048,4096,8k,16k")
    parser.add_argument("--tokenizer-model", default=None,
                        help="sentencepiece .model file or Hugging Face tokenizer directory "
                             "(default: the first checkpoint's: an --hf-dir's own, or the one a "
                             "pose_megatron run recorded)")
    parser.add_argument("--tokenizer-type", default="auto", choices=["auto", "sentencepiece", "huggingface"],
                        help="auto: a directory is a Hugging Face tokenizer, a file a sentencepiece model")
    parser.add_argument("--output", required=True, metavar="FILE.json",
                        help="results JSON; the figure goes next to it as FILE.png")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG figure")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1,
                        help="TP for --load checkpoints (launch world size = TP x PP x DP with torchrun)")
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP for --load checkpoints")
    parser.add_argument("--dtype", default="auto", choices=["auto"] + sorted(runtime.DTYPES),
                        help="compute dtype (auto: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--log-level", default="INFO")


def parse_tool_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse a tool's flags; `args.checkpoints` holds the checkpoints in command-line order."""
    args = parser.parse_args(argv)
    args.checkpoints = checkpoints_from_args(parser, args)
    return args


def tool_parser(description: str, with_lengths: bool = True) -> argparse.ArgumentParser:
    """An evaluation tool's parser holding the common flags (add_common_arguments)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_arguments(parser, with_lengths=with_lengths)
    return parser


def checkpoints_from_args(parser: argparse.ArgumentParser, args) -> List[CheckpointSpec]:
    specs = getattr(args, "checkpoints", None) or []
    if not specs:
        parser.error("give at least one checkpoint: --load DIR or --hf-dir DIR")
    for spec in specs:
        spec.label = spec.label or default_label(spec.path)
    labels = [s.label for s in specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        parser.error(f"checkpoint labels must differ; {duplicates} repeat: name them with --label")
    if args.tensor_model_parallel_size < 1 or args.pipeline_model_parallel_size < 1:
        parser.error("parallel sizes must be >= 1")
    for spec in specs:  # every input and the output, before anything is loaded
        problem = _checkpoint_problem(spec)
        if problem:
            parser.error(problem)
    if os.path.isdir(args.output) or not is_writable(args.output):
        parser.error(f"--output {args.output} cannot be written (a directory, read-only or without "
                     "permission); choose a writable file path")
    return specs


def _checkpoint_problem(spec: CheckpointSpec) -> Optional[str]:
    if spec.kind == "megatron" and not holds_checkpoint(spec.path):
        return why_no_checkpoint(spec.path)
    if spec.kind == "hf" and not os.path.isfile(os.path.join(spec.path, "config.json")):
        return f"--hf-dir {spec.path} is no Hugging Face model directory (no config.json)"
    return None


def _has_hf_tokenizer(directory: str) -> bool:
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    return any(os.path.isfile(os.path.join(directory, n)) for n in names)


def _checkpoint_tokenizer(spec: CheckpointSpec) -> Optional[str]:
    """The tokenizer a checkpoint names: a Hugging Face directory's own, or the tokenizer_model
    a pose_megatron run recorded in its RunConfig (when that file still exists)."""
    if spec.kind == "hf":
        return spec.path if _has_hf_tokenizer(spec.path) else None
    from pose_megatron.checkpoint.layout import load_run_config, resolve_checkpoint_dir

    try:
        run_config = load_run_config(resolve_checkpoint_dir(spec.path))
    except (FileNotFoundError, ValueError):
        return None  # reported properly when the checkpoint is loaded
    path = run_config.extra.get("tokenizer_model") if run_config else None
    return path if path and os.path.exists(path) else None


def resolve_tokenizer(args, specs: Sequence[CheckpointSpec]):
    """The tokenizer named by --tokenizer-model, else the first checkpoint's own, else None."""
    from pose_megatron.tokenizer import build_tokenizer

    path = args.tokenizer_model
    kind = args.tokenizer_type
    if path is None:
        path = next((p for p in map(_checkpoint_tokenizer, specs) if p), None)
        kind = "auto"
        if path is None:
            return None
        logger.info("tokenizer: %s (from the checkpoint)", path)
    if kind == "auto":
        kind = "huggingface" if os.path.isdir(path) else "sentencepiece"
    return build_tokenizer(kind, path)


def required_tokenizer(args, why: str):
    """resolve_tokenizer, or a ValueError saying why this tool needs one and to pass --tokenizer-model."""
    tokenizer = resolve_tokenizer(args, args.checkpoints)
    if tokenizer is None:
        raise ValueError(f"{why}: pass --tokenizer-model")
    return tokenizer


def setup_logging(level: str) -> None:
    """`level` on the first rank; warnings only elsewhere (one copy of each info line)."""
    logging.basicConfig(
        level=level.upper() if runtime.is_first_rank() else "WARNING",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def needs_distributed(specs: Sequence[CheckpointSpec]) -> bool:
    """Megatron checkpoints need torch.distributed; so does any run under torchrun."""
    return any(s.kind == "megatron" for s in specs) or int(os.environ.get("WORLD_SIZE", "1")) > 1


def start_distributed(specs: Sequence[CheckpointSpec]) -> None:
    """torch.distributed for the checkpoints that need it; on CPU with megatron-core's CUDA-only
    calls redirected first (runtime.initialize_distributed refuses CPU otherwise)."""
    if needs_distributed(specs):
        enable_cpu_fallbacks()
        runtime.initialize_distributed()


def evaluate_checkpoints(
    args, evaluate: Callable[[EvalBackend], Result], max_token: Optional[int] = None
) -> Tuple[Dict[str, Result], Dict[str, dict]]:
    """The per-checkpoint loop of every evaluation tool (collective under torchrun): for each
    checkpoint of `args.checkpoints` in order, open its backend, `evaluate(backend)`, record
    `describe()`, close it (the next checkpoint may need the memory). Returns (results, described),
    both keyed by label in checkpoint order. `max_token`: the largest token id the inputs hold; a
    model with a smaller vocabulary is refused before it runs."""
    start_distributed(args.checkpoints)
    results: Dict[str, Result] = {}
    described: Dict[str, dict] = {}
    for spec in args.checkpoints:
        backend = open_backend(
            spec.kind, spec.path, spec.label, dtype=args.dtype,
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        )
        try:
            if max_token is not None and max_token >= backend.vocab_size:
                raise ValueError(
                    f"{spec.path} has a vocabulary of {backend.vocab_size} tokens, but the inputs "
                    f"hold token id {max_token}: evaluate with the checkpoint's own tokenizer "
                    "(and data made with it)")
            results[spec.label] = evaluate(backend)
            described[spec.label] = backend.describe()
        finally:
            backend.close()
    return results, described


def run_tool(parse_args: Callable[[Optional[Sequence[str]]], argparse.Namespace],
             evaluate: Callable[[argparse.Namespace], int], argv: Optional[Sequence[str]] = None) -> int:
    """A tool's main: parse its flags, log at --log-level, run `evaluate(args)`. User errors become
    one line on stderr and exit status 2. Tears down torch.distributed if the run started it (not
    when a caller, e.g. a test, had it running)."""
    args = parse_args(argv)
    setup_logging(args.log_level)
    started_here = not torch.distributed.is_initialized()
    try:
        return evaluate(args)
    except (ValueError, FileNotFoundError) as error:
        logger.debug("user error", exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if started_here and torch.distributed.is_initialized():
            runtime.destroy()
