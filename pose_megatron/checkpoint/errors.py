"""The error every checkpoint conversion raises for bad input, and how a command-line tool shows it."""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Optional, Tuple, TypeVar

Result = TypeVar("Result")


class ConversionError(ValueError):
    """A checkpoint or config cannot be converted; the message says why and what would work."""


def run_conversion_tool(convert: Callable[[], Result], log_level: str) -> Optional[Tuple[Result, float]]:
    """Run one conversion for a command-line tool: (its result, seconds taken), or None after
    printing a ConversionError as one `error: ...` line on stderr (the tool then exits with 1).

    Logging goes to stderr at `log_level`; megatron's import-time INFO lines are kept out unless
    the level asks for DEBUG. Other exceptions propagate: they are bugs, not bad input.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(max(logging.WARNING, logging.root.level))
    start = time.perf_counter()
    try:
        result = convert()
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return None
    return result, time.perf_counter() - start
