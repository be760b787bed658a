"""Passkey retrieval, the paper's prompt and scoring (docs/reference.md, "Evaluation protocols").

The prompt is the task line, filler, the key line, more filler and the question, one per line (the
layout of the landmark-attention test PoSE uses): the filler before the key is the first `k` words of
the repeated filler sentences and the filler after it the first `n - k`, with `k = round(depth * n)`.

A test at length L must not read past L: the filler word count `n` is searched so that BOS + the
prompt + the answer's `max_new_tokens` fit in L tokens, and fall short of L by at most one filler
sentence (the longest one, in tokens). A trial that no word count fits that way is skipped and
counted; a length at which every trial is skipped is an error. The model decodes greedily; a trial
is correct when the first integer of its answer is the key.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from pose_megatron.evaluation.backend import EvalBackend
from pose_megatron.evaluation.perplexity import warn_extrapolation

logger = logging.getLogger(__name__)

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
KEY_RANGE = (1, 50000)
"""Keys are uniform integers in this closed range (as in the landmark-attention passkey test)."""

_FILLER_WORDS = FILLER.split(" ")
FILLER_SENTENCES = [s if s.endswith(".") else s + "." for s in FILLER.split(". ")]
"""The filler's sentences; the longest, in tokens, is how far a prompt may fall short of its length."""


def key_line(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def filler(num_words: int) -> str:
    """The first num_words words of the filler sentences repeated without end."""
    reps = -(-num_words // len(_FILLER_WORDS)) if num_words > 0 else 0
    return " ".join((_FILLER_WORDS * reps)[:num_words])


def prompt_text(key: int, words_before: int, words_after: int) -> str:
    return "\n".join([TASK, filler(words_before), key_line(key), filler(words_after), QUESTION])


def first_integer(text: str) -> Optional[int]:
    """The first run of digits in text, as an int (None when there is none)."""
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


@dataclass
class PasskeyPrompt:
    """A tokenized passkey prompt."""

    length: int
    """Requested length in tokens (BOS included)."""
    depth: float
    """Requested depth: the fraction of the filler placed before the key line."""
    key: int
    token_ids: np.ndarray
    """BOS + the prompt's tokens."""
    filler_words: int
    """Words of filler in total (before + after the key)."""
    key_token_index: int
    """Index in token_ids where the key line starts."""
    realized_depth: float
    """Filler tokens before the key line / all filler tokens."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class PromptDoesNotFit(ValueError):
    """No filler word count puts a trial's prompt in its token range (the trial is skipped)."""


class PasskeyPromptBuilder:
    """Builds prompts that fit a requested token length for one tokenizer (caches its filler
    density). `answer_tokens` is the room kept for the answer (the tool's --max-new-tokens): BOS +
    prompt + answer_tokens <= length >= the same minus one filler sentence."""

    def __init__(self, tokenizer, answer_tokens: int = 0, bos: Optional[int] = None):
        if answer_tokens < 0:
            raise ValueError(f"answer_tokens must be >= 0, got {answer_tokens}")
        self.tokenizer = tokenizer
        self.answer_tokens = answer_tokens
        self.bos = tokenizer.bos if bos is None else bos
        self._head = [] if self.bos is None else [self.bos]
        probe = 400
        self.tokens_per_word = len(tokenizer.tokenize(filler(probe))) / probe
        self.sentence_tokens = max(len(tokenizer.tokenize(s)) for s in FILLER_SENTENCES)
        """How many tokens short of its budget a prompt may be: one filler sentence."""
        self._hint: Dict[int, int] = {}  # length -> filler words that fitted last time
        self._task_tokens = len(self._tokens(TASK + "\n"))  # where the filler starts

    def _tokens(self, text: str) -> List[int]:
        return self._head + list(self.tokenizer.tokenize(text))

    def _split(self, words: int, depth: float):
        before = round(depth * words)
        return before, words - before

    def budget(self, length: int) -> int:
        """The most tokens BOS + prompt may hold at `length` (the answer needs the rest)."""
        return length - self.answer_tokens

    def build(self, length: int, depth: float, key: int) -> PasskeyPrompt:
        """The prompt with the most filler that fits the budget; PromptDoesNotFit when even no
        filler is too long, or when the closest fit falls short by more than one filler sentence."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        budget = self.budget(length)

        built: Dict[int, List[int]] = {}  # filler words -> BOS + prompt token ids

        def size(words: int) -> int:
            if words not in built:
                built[words] = self._tokens(prompt_text(key, *self._split(words, depth)))
            return len(built[words])

        bare = size(0)
        if bare > budget:
            raise PromptDoesNotFit(
                f"a passkey prompt needs {bare} tokens without any filler, plus {self.answer_tokens} "
                f"for the answer; {length} is too short")
        words = self._hint.get(length, max(0, round((budget - bare) / self.tokens_per_word)))
        for _ in range(30):  # secant steps on the word count; token counts are near-linear in it
            miss = budget - size(words)
            if 0 <= miss < self.sentence_tokens:
                break
            step = round(miss / self.tokens_per_word) or (1 if miss > 0 else -1)
            if max(0, words + step) in built:
                break  # cycling between two counts: settle below
            words = max(0, words + step)
        # Settle on the most words that fit: the largest count tried that fits, then up while one
        # more fits (a word is a few tokens, so the walk is short).
        words = max((w for w, ids in built.items() if len(ids) <= budget), default=0)
        ceiling = max(built) + 64
        while words < ceiling and size(words + 1) <= budget:
            words += 1
        if size(words) < budget - self.sentence_tokens:
            raise PromptDoesNotFit(
                f"no filler length puts a passkey prompt (key {key}, depth {depth:.3f}) within "
                f"{self.sentence_tokens} tokens below {budget} (closest {size(words)})")
        self._hint[length] = words
        before, _ = self._split(words, depth)
        start = self._task_tokens
        key_index = len(self._tokens(TASK + "\n" + filler(before) + "\n"))
        filler_tokens = max(1, size(words) - bare)
        return PasskeyPrompt(
            length=length,
            depth=depth,
            key=key,
            token_ids=np.asarray(built[words], dtype=np.int64),
            filler_words=words,
            key_token_index=key_index,
            realized_depth=min(1.0, max(0.0, (key_index - start) / filler_tokens)),
        )


@dataclass
class PasskeyTrial:
    """One prompt to pose: its length, depth and key are drawn from the seed before any model runs."""

    length: int
    depth: float
    key: int
    index: int
    """Trial number within its (length, depth) cell."""


def make_trials(
    lengths: Sequence[int], trials: int, depths: Optional[Sequence[float]] = None, seed: int = 0
) -> List[PasskeyTrial]:
    """`trials` trials per length (per length and depth when `depths` is given; else each trial's
    depth is uniform in [0, 1]). Each trial has its own generator seeded by (seed, length, depth
    slot, index), so a trial does not change when other lengths or counts are added."""
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    for d in depths or ():
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"depths must be in [0, 1], got {d}")
    out = []
    slots = list(depths) if depths else [None]
    for length in lengths:
        for slot, depth in enumerate(slots):
            for i in range(trials):
                rng = np.random.default_rng([seed, length, slot, i])
                key = int(rng.integers(KEY_RANGE[0], KEY_RANGE[1] + 1))
                trial_depth = float(rng.random()) if depth is None else float(depth)
                out.append(PasskeyTrial(length=length, depth=trial_depth, key=key, index=i))
    return out


@dataclass
class SkippedTrial:
    """A trial whose prompt could not be built to fit its length."""

    length: int
    depth: float
    key: int
    index: int
    reason: str
    """Why it did not fit (PromptDoesNotFit's message)."""


@dataclass
class PasskeyPlan:
    """The prompts of a set of trials: those that fit, and the trials skipped because none did."""

    prompts: List[PasskeyPrompt]
    skipped: List[SkippedTrial]

    def skipped_by_length(self, lengths: Sequence[int]) -> Dict[int, int]:
        """Skipped trials per length (0 where none was), for the JSON and the tables."""
        return {n: sum(1 for t in self.skipped if t.length == n) for n in lengths}


def plan_prompts(builder: PasskeyPromptBuilder, trials: Sequence[PasskeyTrial]) -> PasskeyPlan:
    """Build every trial's prompt; a trial that does not fit is skipped and recorded. A length at
    which every trial is skipped is an error (nothing would be measured there)."""
    prompts, skipped = [], []
    for t in trials:
        try:
            prompts.append(builder.build(t.length, t.depth, t.key))
        except PromptDoesNotFit as error:
            skipped.append(SkippedTrial(length=t.length, depth=t.depth, key=t.key, index=t.index,
                                        reason=str(error)))
    built = {p.length for p in prompts}
    for length in dict.fromkeys(t.length for t in trials):
        if length not in built:
            reason = next(s.reason for s in skipped if s.length == length)
            raise ValueError(f"every passkey trial at length {length} was skipped ({reason}); "
                             "drop that length from --lengths or lower --max-new-tokens")
    return PasskeyPlan(prompts=prompts, skipped=skipped)


def build_prompts(builder: PasskeyPromptBuilder, trials: Sequence[PasskeyTrial]) -> List[PasskeyPrompt]:
    """Every trial's prompt, refusing any skip (PromptDoesNotFit): for callers that need all of them."""
    plan = plan_prompts(builder, trials)
    if plan.skipped:
        raise PromptDoesNotFit(plan.skipped[0].reason)
    return plan.prompts


@dataclass
class PasskeyOutcome:
    """What a model answered to one prompt."""

    length: int
    depth: float
    realized_depth: float
    key: int
    prompt_tokens: int
    answer: str
    predicted: Optional[int]
    correct: bool


def evaluate_passkey(
    backend: EvalBackend,
    prompts: Sequence[PasskeyPrompt],
    detokenize,
    *,
    max_new_tokens: int = 10,
    stop_ids: Sequence[int] = (),
    progress: bool = True,
) -> List[PasskeyOutcome]:
    """Greedy answers to every prompt (split over data-parallel replicas; collective); every rank
    returns all outcomes in prompt order."""
    warn_extrapolation(backend, sorted({p.num_tokens for p in prompts}), what="prompt")
    order = list(range(len(prompts)))[backend.dp_rank :: backend.dp_size]
    mine = []
    started = time.perf_counter()
    for i in tqdm(order, desc=f"{backend.label} passkey", disable=not (progress and backend.is_main), leave=False):
        prompt = prompts[i]
        generated = backend.greedy_generate(prompt.token_ids, max_new_tokens, stop_ids)
        answer = detokenize([t for t in generated if t not in stop_ids])
        predicted = first_integer(answer)
        mine.append((i, PasskeyOutcome(
            length=prompt.length, depth=prompt.depth, realized_depth=prompt.realized_depth,
            key=prompt.key, prompt_tokens=prompt.num_tokens, answer=answer, predicted=predicted,
            correct=predicted == prompt.key,
        )))
    gathered = sorted(backend.gather_results(mine), key=lambda item: item[0])
    if len(gathered) != len(prompts):
        raise RuntimeError(f"gathered {len(gathered)} passkey outcomes for {len(prompts)} prompts")
    if backend.is_main:
        logger.info("%s: %d passkey trials in %.1f s", backend.label, len(prompts), time.perf_counter() - started)
    return [outcome for _, outcome in gathered]


def answer_decoder(tokenizer):
    """detokenize() for answers: ids beyond the tokenizer's vocabulary (a model's padded
    embedding rows) cannot spell the key, so they are dropped rather than failing the decode."""

    def decode(ids):
        return tokenizer.detokenize([i for i in ids if 0 <= i < tokenizer.vocab_size])

    return decode


def depth_bin(depth: float, explicit: bool, bins: int = 5) -> str:
    """Heatmap row of a depth: the depth itself when depths were given, else one of `bins` bins."""
    if explicit:
        return f"{depth:g}"
    b = min(int(depth * bins), bins - 1)
    return f"{b / bins:.1f}-{(b + 1) / bins:.1f}"


@dataclass
class PasskeySummary:
    """Accuracy by length, and by length and depth, of one checkpoint."""

    by_length: Dict[int, dict] = field(default_factory=dict)
    """length -> {"accuracy", "correct", "trials"}."""
    by_depth: Dict[int, Dict[str, dict]] = field(default_factory=dict)
    """length -> depth label -> {"accuracy", "correct", "trials"}."""
    skipped: Dict[int, int] = field(default_factory=dict)
    """length -> trials skipped because their prompt did not fit (not in "trials")."""

    def to_json(self) -> dict:
        return {
            "by_length": {str(k): v for k, v in self.by_length.items()},
            "by_depth": {str(k): v for k, v in self.by_depth.items()},
            "skipped": {str(k): v for k, v in self.skipped.items()},
        }


def summarize(outcomes: Sequence[PasskeyOutcome], explicit_depths: bool,
              skipped: Optional[Dict[int, int]] = None) -> PasskeySummary:
    """Accuracy over the answered trials; `skipped` (PasskeyPlan.skipped_by_length) is carried along."""
    summary = PasskeySummary(skipped=dict(skipped or {}))

    def add(cell: dict, correct: bool) -> None:
        cell["trials"] = cell.get("trials", 0) + 1
        cell["correct"] = cell.get("correct", 0) + int(correct)
        cell["accuracy"] = cell["correct"] / cell["trials"]

    for o in outcomes:
        add(summary.by_length.setdefault(o.length, {}), o.correct)
        label = depth_bin(o.depth, explicit_depths)
        add(summary.by_depth.setdefault(o.length, {}).setdefault(label, {}), o.correct)
    return summary


def outcomes_to_json(outcomes: Sequence[PasskeyOutcome]) -> List[dict]:
    return [asdict(o) for o in outcomes]
