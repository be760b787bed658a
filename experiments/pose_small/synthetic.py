"""Synthetic long-range retrieval documents in the passkey evaluation's format.

A model of a few million parameters trained on source code barely needs context beyond a few
hundred tokens, so context extension methods cannot be told apart on that text alone. These
documents make long context matter: a key is stated once, and later questions can only be answered
by finding it again. The text reuses the evaluation prompt's own strings (task line, filler, key
line, question; pose_megatron.evaluation.passkey), so what this experiment's pretraining teaches is
exactly what the passkey test asks (the training-data side of the experiment depends on the
evaluation, never the other way round):

    TASK
    filler(a)
    The pass key is K. Remember it. K is the pass key.
    filler(g_1)
    What is the pass key? The pass key is K.
    filler(g_2)
    What is the pass key? The pass key is K.
    ...

one segment per line (the evaluation prompt's layout). `a` is the filler before the key, `g_i` the
filler before question i; questions are added until the document reaches its token budget. The
first question's distance to the key is the retrieval distance; later questions may also copy the
previous answer, which is itself at distance g_i. Gaps are log-uniform between `min_gap` and
`max_gap` tokens, so short and long distances both occur; `max_gap` up to the window trains the
window's full range of distances.

Extension documents leave the task line out and open with the key: a PoSE sample's first chunk
holds at most L_c / 2 tokens, fewer than the task and key lines together at L_c = 128, and only a
key in the first chunk with a question in the second teaches retrieval across the position skip.
Every method trains on the same documents.

For far-token scoring (`answer_spans`) the answer digits are located in the tokenized document;
`far_answer_spans` keeps the answers whose previous mention of the key lies beyond a short
window, the tokens a short context cannot copy.

Lengths are planned in tokens through `tokens_per_word` (the filler's measured density, see
`filler_tokens_per_word`), so a document's realised token count is close to, not exactly, the plan.
Numpy only; the tokenizer is needed only to measure the density.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Iterator, List, Optional, Tuple

import numpy as np

from pose_megatron.evaluation.passkey import KEY_RANGE, QUESTION, TASK, filler, key_line

LINE_TOKENS = {"task": 42, "key": 27, "qa": 21}
"""Approximate tokens of the fixed lines (newline included) with the sample corpus tokenizer; only
used to plan filler lengths, so other tokenizers merely shift lengths a little."""


def answer_line(key: int) -> str:
    """The question followed by its answer, as the evaluation expects the model to continue it."""
    return f"{QUESTION} {key}."


def filler_tokens_per_word(tokenizer, probe_words: int = 400) -> float:
    """Tokens per filler word for `tokenizer` (the filler's repeating sentences tokenize uniformly)."""
    return len(tokenizer.tokenize(filler(probe_words))) / probe_words


@dataclass(frozen=True)
class RetrievalDocSpec:
    """How retrieval documents are drawn (all lengths in tokens)."""

    num_tokens: int
    """Token budget of a document: questions are added while the document is shorter."""
    max_key_offset: int
    """Filler before the key line is uniform on 0..max_key_offset tokens."""
    min_gap: int = 8
    """Smallest filler gap before a question."""
    max_gap: int = 256
    """Largest filler gap before a question (the longest key-to-question distance, roughly)."""
    tokens_per_word: float = 1.85
    """Filler density used to turn token plans into words (measure with filler_tokens_per_word)."""
    lead_with_task: bool = True
    """Open with the evaluation's task line (else the document opens with the filler and key)."""
    first_answer_by: int = 0
    """When > 0, the first question's answer is planned to end by this token (a window-long
    training sample then holds it, while the document runs on past the window)."""

    def __post_init__(self):
        if self.num_tokens < LINE_TOKENS["task"] + LINE_TOKENS["key"] + LINE_TOKENS["qa"]:
            raise ValueError(f"num_tokens {self.num_tokens} cannot hold the task, key and one question")
        if not 1 <= self.min_gap <= self.max_gap:
            raise ValueError(f"need 1 <= min_gap <= max_gap, got {self.min_gap}, {self.max_gap}")
        if self.max_key_offset < 0 or self.tokens_per_word <= 0:
            raise ValueError("max_key_offset must be >= 0 and tokens_per_word > 0")


@dataclass
class RetrievalDoc:
    """One generated document and where its pieces are (in planned filler words / tokens)."""

    text: str
    key: int
    key_offset_words: int
    """Filler words before the key line."""
    gap_words: List[int]
    """Filler words before each question."""
    planned_tokens: int
    """The token count the plan aimed at (the realised count is within a few percent)."""

    def to_json(self) -> dict:
        return asdict(self)


def _log_uniform(rng: np.random.Generator, low: int, high: int) -> int:
    if high <= low:
        return int(low)
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def make_retrieval_doc(rng: np.random.Generator, spec: RetrievalDocSpec) -> RetrievalDoc:
    """Draw one document: a key at a random offset, then questions after log-uniform gaps."""
    tpw = spec.tokens_per_word
    key = int(rng.integers(KEY_RANGE[0], KEY_RANGE[1] + 1))
    offset_tokens = int(rng.integers(0, spec.max_key_offset + 1))
    key_words = int(round(offset_tokens / tpw))
    if spec.lead_with_task:
        used = LINE_TOKENS["task"] + offset_tokens + LINE_TOKENS["key"]
        lines = [TASK, filler(key_words), key_line(key)]
    else:
        used = offset_tokens + LINE_TOKENS["key"]
        lines = ([filler(key_words)] if key_words else []) + [key_line(key)]
    gaps: List[int] = []
    while True:
        # Every question fits the budget (a gap is shrunk to what is left, but kept >= min_gap),
        # so a window-long training sample sees its questions.
        limit = spec.first_answer_by if spec.first_answer_by and not gaps else spec.num_tokens
        room = limit - used - LINE_TOKENS["qa"]
        gap_tokens = max(spec.min_gap, min(_log_uniform(rng, spec.min_gap, spec.max_gap), room))
        words = max(1, int(round(gap_tokens / tpw)))
        lines += [filler(words), answer_line(key)]
        gaps.append(words)
        used += gap_tokens + LINE_TOKENS["qa"]
        if used >= spec.num_tokens - spec.min_gap - LINE_TOKENS["qa"]:
            break
    return RetrievalDoc(text="\n".join(lines), key=key, key_offset_words=key_words,
                        gap_words=gaps, planned_tokens=used)


def pretraining_spec(window: int, tokens_per_word: float) -> RetrievalDocSpec:
    """Documents for pretraining at `window`, laid out like the passkey prompt at that length: the
    task line, the key in the first half of the room the fixed lines leave, and a first question
    that ends inside the window (a training sample is the document's first window), then more
    questions."""
    # A sixteenth of the window is kept free: short filler runs tokenize denser than the planned
    # density, so realised lengths exceed planned ones by a few tokens.
    # The document runs on by a quarter window, since the dataset keeps only documents longer than
    # the window (so every sample is full length).
    budget = window - window // 16
    room = budget - LINE_TOKENS["task"] - LINE_TOKENS["key"] - LINE_TOKENS["qa"]
    if room < 8:
        raise ValueError(f"a {window}-token window cannot hold the task, key and question lines")
    return RetrievalDocSpec(num_tokens=window + window // 4, max_key_offset=room // 2, min_gap=8, max_gap=room,
                            tokens_per_word=tokens_per_word, first_answer_by=budget)


def extension_spec(target: int, window: int, tokens_per_word: float) -> RetrievalDocSpec:
    """Documents for extension from `window` to `target`: longer than the target (so full-length
    training reads a full window), the key at the start (within a sixteenth of the window: a PoSE
    sample's first chunk holds it about half the time), questions after gaps up to the target."""
    return RetrievalDocSpec(num_tokens=target + target // 8, max_key_offset=window // 16,
                            min_gap=8, max_gap=target - LINE_TOKENS["key"],
                            tokens_per_word=tokens_per_word, lead_with_task=False)


def iter_retrieval_docs(spec: RetrievalDocSpec, num_docs: int, seed: int) -> Iterator[RetrievalDoc]:
    """`num_docs` documents; document i depends only on (seed, i)."""
    for i in range(num_docs):
        yield make_retrieval_doc(np.random.default_rng([seed, i]), spec)


def write_retrieval_jsonl(path: str, spec: RetrievalDocSpec, num_docs: int, seed: int,
                          json_key: str = "text") -> int:
    """Write `num_docs` documents as JSON lines ({json_key: text, "key": K}); returns the count."""
    count = 0
    with open(path, "w", encoding="utf-8") as out:
        for doc in iter_retrieval_docs(spec, num_docs, seed):
            out.write(json.dumps({json_key: doc.text, "key": doc.key}) + "\n")
            count += 1
    return count


def _occurrences(ids: List[int], pattern: List[int]) -> List[int]:
    """Start indices of every occurrence of `pattern` in `ids`."""
    n = len(pattern)
    return [i for i in range(len(ids) - n + 1) if ids[i:i + n] == pattern]


def key_question_distances(token_ids, key: int, tokenizer) -> List[int]:
    """Token distances from the key line's start to each question's answer, for checking a
    tokenized document (tests and diagnostics)."""
    ids = list(token_ids)
    key_ids = tokenizer.tokenize(key_line(key))
    question_ids = tokenizer.tokenize(QUESTION)
    starts = _occurrences(ids, key_ids)
    if not starts:
        return []
    start = starts[0]
    return [i + len(question_ids) - start for i in _occurrences(ids, question_ids)
            if i >= start + len(key_ids)]


def key_mentions(token_ids, key: int, tokenizer) -> List[Tuple[int, int]]:
    """Token spans [first, end) of every mention of the key: the maximal runs of digit tokens (the
    filler and the fixed lines hold no digit). Each run must spell the key."""
    ids = [int(t) for t in token_ids]
    is_digit = {t: tokenizer.detokenize([t]).strip().isdigit() for t in set(ids)}
    runs, first = [], None
    for i, t in enumerate(ids + [None]):
        if t is not None and is_digit[t]:
            first = i if first is None else first
        elif first is not None:
            runs.append((first, i))
            first = None
    for a, b in runs:
        if tokenizer.detokenize(ids[a:b]).strip() != str(key):
            raise ValueError(f"tokens {a}..{b - 1} spell {tokenizer.detokenize(ids[a:b])!r}, not the key {key}")
    return runs


def answer_spans(token_ids, key: int, tokenizer,
                 mentions: Optional[List[Tuple[int, int]]] = None) -> List[Tuple[int, int]]:
    """Token spans of the answers' digits: the key mentions (`key_mentions`, unless given) that
    follow a question (after at most a separating space token)."""
    ids = [int(t) for t in token_ids]
    question = list(tokenizer.tokenize(QUESTION))
    ends = {i + len(question) for i in _occurrences(ids, question)}
    mentions = key_mentions(ids, key, tokenizer) if mentions is None else mentions
    return [(a, b) for a, b in mentions if a in ends or a - 1 in ends]


def far_answer_spans(token_ids, key: int, tokenizer, window: int) -> List[Tuple[int, int]]:
    """The answers whose previous key mention (the key line or an earlier answer) ends at least
    window - 1 tokens before them: no `window`-token context ending at the answer can copy it."""
    mentions = key_mentions(token_ids, key, tokenizer)
    answers = set(answer_spans(token_ids, key, tokenizer, mentions))
    far, previous_end = [], None
    for span in mentions:
        if span in answers and previous_end is not None and span[0] - previous_end >= window - 1:
            far.append(span)
        previous_end = span[1]
    return far


def measure_lengths(docs: List[RetrievalDoc], tokenizer) -> np.ndarray:
    """Realised token counts of documents (for the README's description of the data)."""
    return np.asarray([len(tokenizer.tokenize(d.text)) for d in docs], dtype=np.int64)


def describe(spec: RetrievalDocSpec, tokenizer=None, sample: int = 50, seed: int = 0) -> dict:
    """The spec plus realised length statistics of a sample of its documents."""
    info = asdict(spec)
    if tokenizer is not None:
        docs = list(iter_retrieval_docs(spec, sample, seed))
        lengths = measure_lengths(docs, tokenizer)
        info.update(realised_tokens_mean=float(lengths.mean()), realised_tokens_min=int(lengths.min()),
                    realised_tokens_max=int(lengths.max()),
                    questions_per_doc=float(np.mean([len(d.gap_words) for d in docs])))
    return info


__all__ = [
    "LINE_TOKENS", "RetrievalDoc", "RetrievalDocSpec", "answer_line", "answer_spans", "describe",
    "extension_spec", "far_answer_spans", "filler_tokens_per_word", "iter_retrieval_docs", "key_mentions",
    "key_question_distances", "make_retrieval_doc", "pretraining_spec", "write_retrieval_jsonl",
]
