"""Long-context evaluation: sliding-window perplexity, passkey retrieval and far-token scoring
(docs/reference.md, "Evaluation protocols").

- backend.py     the model interface (score windows, greedy-generate) and the registry of backends
                 by name; megatron_backend.py ("megatron": checkpoints at any TP / PP / DP) and
                 hf_backend.py ("hf": transformers) register themselves and are imported on first use
- windows.py     the perplexity protocol's window bookkeeping (pure, no torch)
- scoring.py     NLL sums over planned windows, split over data-parallel replicas
- documents.py   evaluation documents from a .bin/.idx prefix or a JSONL file
- perplexity.py  the perplexity driver;  passkey.py  prompts, trials, scoring
- far_tokens.py  the same far tokens scored with full and with short context
- report.py      JSON, tables, PNG figures;  cli.py  flags and the per-checkpoint loop of the tools
"""

from pose_megatron.evaluation.backend import (
    BACKENDS,
    BackendOptions,
    EvalBackend,
    ScoreRequest,
    open_backend,
    register_backend,
)
from pose_megatron.evaluation.documents import (
    DocumentSet,
    NoUsableDocumentsError,
    load_documents,
)
from pose_megatron.evaluation.far_tokens import FarTokenResult, evaluate_far_tokens
from pose_megatron.evaluation.passkey import (
    PasskeyPromptBuilder,
    PromptDoesNotFit,
    evaluate_passkey,
    first_integer,
    make_trials,
    plan_prompts,
    summarize,
)
from pose_megatron.evaluation.perplexity import (
    ExtrapolationWarning,
    PerplexityResult,
    evaluate_perplexity,
)
from pose_megatron.evaluation.windows import Window, plan_windows

__all__ = [
    "BACKENDS",
    "BackendOptions",
    "DocumentSet",
    "EvalBackend",
    "ExtrapolationWarning",
    "FarTokenResult",
    "NoUsableDocumentsError",
    "PasskeyPromptBuilder",
    "PerplexityResult",
    "PromptDoesNotFit",
    "ScoreRequest",
    "Window",
    "evaluate_far_tokens",
    "evaluate_passkey",
    "evaluate_perplexity",
    "first_integer",
    "load_documents",
    "make_trials",
    "open_backend",
    "plan_prompts",
    "plan_windows",
    "register_backend",
    "summarize",
]
