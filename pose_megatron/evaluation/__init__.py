"""Long-context evaluation: sliding-window perplexity and passkey retrieval (REFERENCE.md section 3).

- windows.py     the perplexity protocol's window bookkeeping (pure, no torch)
- documents.py   evaluation documents from a .bin/.idx prefix or a JSONL file
- backends.py    the model interface (score windows, greedy-generate) and its factory;
                 megatron_backend.py (checkpoints at any TP / PP / DP), hf_backend.py (transformers)
- perplexity.py  the perplexity driver;  passkey.py  prompts, trials, scoring
- report.py      JSON, tables, PNG figures;  cli.py  what the two tools share
"""

from pose_megatron.evaluation.backends import EvalBackend, ScoreRequest, open_backend
from pose_megatron.evaluation.documents import (
    DocumentSet,
    NoUsableDocumentsError,
    load_documents,
)
from pose_megatron.evaluation.passkey import (
    PasskeyPromptBuilder,
    evaluate_passkey,
    first_integer,
    make_trials,
    summarize,
)
from pose_megatron.evaluation.perplexity import (
    ExtrapolationWarning,
    PerplexityResult,
    evaluate_perplexity,
)
from pose_megatron.evaluation.windows import Window, plan_windows

__all__ = [
    "DocumentSet",
    "EvalBackend",
    "ExtrapolationWarning",
    "NoUsableDocumentsError",
    "PasskeyPromptBuilder",
    "PerplexityResult",
    "ScoreRequest",
    "Window",
    "evaluate_passkey",
    "evaluate_perplexity",
    "first_integer",
    "load_documents",
    "make_trials",
    "open_backend",
    "plan_windows",
    "summarize",
]
