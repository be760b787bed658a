"""`python -m pose_megatron.train ...` (under torchrun for several processes): PoSE training.

Flags follow Megatron-LM's names; `--help` lists them. Contradictory settings stop with one message
before any process group is created.
"""

import logging
import os
import sys
import warnings

import torch

if not torch.cuda.is_available():
    # Without CUDA, megatron-core's fallbacks to torch norms and optimizers are the expected path;
    # its import-time warnings about missing apex / Transformer Engine would only be noise.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed")

from pose_megatron import runtime  # noqa: E402
from pose_megatron._compat import enable_cpu_fallbacks  # noqa: E402
from pose_megatron.train.arguments import parse_args  # noqa: E402
from pose_megatron.train.loop import SaveFailed, run_training  # noqa: E402


def main(argv=None) -> int:
    first_rank = runtime.is_first_rank()  # one copy of the setup logs, as Megatron prints them
    logging.basicConfig(level=logging.INFO if first_rank else logging.WARNING,
                        format="[%(asctime)s] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lists every parameter
    run = parse_args(argv)
    enable_cpu_fallbacks()
    try:
        saved = run_training(run)
    except (ValueError, FileNotFoundError, SaveFailed) as err:  # user errors: one line, no traceback
        rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"{rank}error: {err}", file=sys.stderr, flush=True)
        logging.getLogger("pose_megatron.train").debug("traceback", exc_info=True)
        return 1
    if saved and first_rank:
        print(f"checkpoint: {saved}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
