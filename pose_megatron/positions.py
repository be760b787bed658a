"""The PoSE sampler: which document tokens fill the training window, and their position ids.

PoSE trains at the model's window L_c (`seq_length`) but wants it to meet every relative distance
up to L_t (`target_length`). A sample cuts the window into chunks; every chunk keeps contiguous
positions, and chunk i is moved forward by a position skip u_i (0 = u_0 <= u_1 <= ... <= L_t - L_c),
so the gaps between chunks cover the long distances. Independently, chunk i reads the document from
a content skip v_i (0 = v_0 <= v_1 <= ... <= L_x - L_c), L_x being the source text window's length.

With chunk starts s_i (s_0 = 0) every token j of chunk i gets
    token_index[j]  = j + v_i      (index into the document)
    position_ids[j] = j + u_i      (its RoPE position)
so both arrays are strictly increasing and the largest position is L_c - 1 + u_{N-1} <= L_t - 1.

The laws (docs/reference.md, "PoSE sampling"), for a document of n >= L_c tokens:
- num_chunks=2, content="skip": the paper's reference law. l_0 ~ U{1..ceil(L_c/2)}, the first
  chunk is unshifted, u_1 ~ U{0..L_t-L_c}, chunk 1's content ends at e ~ U{L_c..L_x}
  (v_1 = e - L_c).
- num_chunks=N>2: the paper's sequential skips, u_i ~ U{u_(i-1)..L_t-L_c} and
  v_i ~ U{v_(i-1)..L_x-L_c} for i = 1..N-1, drawn one after the other. The paper gives no law for
  the N chunk lengths; ours: the N-1 cut points are a uniform random (N-1)-subset of 1..L_c-1.
- num_chunks=seq_length: RandPos as the authors' code draws it: the text is contiguous (the first
  L_c tokens; `content` does not apply) and the positions are a uniform random sorted L_c-subset of
  range(L_t) (every token its own chunk).
- content="contiguous": v_i = 0 (positions skip, text does not; what instruction tuning wants).
- documents shorter than L_c (n tokens): the whole document, contiguous; the rules above with n in
  place of L_c and position skips bounded by L_t - n (RandPos: a sorted n-subset of range(L_t)).
  The sample is shorter than L_c and the caller pads it.
num_chunks=1 is plain contiguous training (allowed only with target_length = seq_length).

The dataset draws seq_length + 1 (token, position) pairs per sample, inputs plus the label of the
last input (`PoseSampling.with_extra_token`): the laws above then hold at L_c + 1 and L_t + 1.

Numpy only (no torch, no Megatron): the data loader calls this once per sample at L_c=4096,
L_t=131072, so everything is vectorised over tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy

CONTENT_MODES = ("skip", "contiguous")
"""Allowed values of PoseSampling.content."""

DEFAULT_CONTENT_WINDOW_FACTOR = 5
"""The reference truncates each document to 5 x L_c tokens before drawing the content skip."""


@dataclass(frozen=True)
class PoseSampling:
    """How a PoSE sample is cut (validated on construction)."""

    seq_length: int
    """L_c: tokens per sample, the window the model is trained at (its original context)."""

    target_length: int
    """L_t: the context to extend to. Every position id is < target_length. Equal to seq_length
    (with content="contiguous") gives plain 0..L_c-1, the PI-only baseline."""

    num_chunks: int = 2
    """N: chunks per sample. 2 is the paper's reference; N=seq_length is the RandPos baseline."""

    content: str = dataclasses.field(default="skip", metadata={"choices": CONTENT_MODES})
    """Which text fills the chunks: "skip" draws content skips inside the content window (the
    reference), "contiguous" reads one contiguous run from the start of the document."""

    content_window: Optional[int] = None
    """L_x upper bound: only the first content_window tokens of a document are used by one sample.
    None means 5 * seq_length, as in the reference."""

    def __post_init__(self) -> None:
        for name in ("seq_length", "target_length", "num_chunks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)):
                raise ValueError(f"PoseSampling.{name} must be an int, got {value!r}")
        if self.seq_length < 1:
            raise ValueError(f"PoseSampling.seq_length must be >= 1, got {self.seq_length}")
        if self.target_length < self.seq_length:
            raise ValueError(
                f"PoseSampling.target_length ({self.target_length}) must be >= seq_length "
                f"({self.seq_length}); set target_length to the context you extend to"
            )
        if not 1 <= self.num_chunks <= self.seq_length:
            raise ValueError(
                f"PoseSampling.num_chunks must be in 1..seq_length (1..{self.seq_length}), "
                f"got {self.num_chunks}; 2 is the PoSE reference, seq_length is RandPos"
            )
        if self.num_chunks == 1 and 1 < self.seq_length < self.target_length:
            raise ValueError(
                f"PoseSampling.num_chunks 1 cannot skip positions, so target_length "
                f"{self.target_length} would be ignored; use num_chunks 2 (PoSE) or set "
                f"target_length to seq_length ({self.seq_length}) for plain training"
            )
        if self.content not in CONTENT_MODES:
            raise ValueError(
                f"PoseSampling.content must be one of {CONTENT_MODES}, got {self.content!r}"
            )
        if self.content_window is not None and (
            isinstance(self.content_window, bool)
            or not isinstance(self.content_window, (int, numpy.integer))
            or self.content_window < self.seq_length
        ):
            raise ValueError(
                f"PoseSampling.content_window must be None (= {DEFAULT_CONTENT_WINDOW_FACTOR} x "
                f"seq_length) or an int >= seq_length ({self.seq_length}), "
                f"got {self.content_window!r}"
            )

    @property
    def is_randpos(self) -> bool:
        """One chunk per token: the RandPos baseline (contiguous text, random sorted positions)."""
        return self.num_chunks == self.seq_length and self.target_length > self.seq_length

    @property
    def window(self) -> int:
        """The content window actually used: content_window, or 5 x seq_length when None."""
        if self.content_window is None:
            return DEFAULT_CONTENT_WINDOW_FACTOR * self.seq_length
        return int(self.content_window)

    def with_extra_token(self) -> "PoseSampling":
        """The settings that draw seq_length+1 (token, position) pairs for inputs plus labels.

        The first seq_length pairs are the model inputs, the last seq_length pairs give the labels.
        target_length grows by one as well, so the input positions keep the law of `self`
        (u_1 ~ U{0..L_t-L_c}, largest input position L_t - 1) and only the label-only last pair can
        reach position L_t. RandPos stays RandPos (one token per chunk).
        """
        num_chunks = self.num_chunks + 1 if self.num_chunks == self.seq_length else self.num_chunks
        return dataclasses.replace(
            self,
            seq_length=self.seq_length + 1,
            target_length=self.target_length + 1,
            num_chunks=num_chunks,
            content_window=max(self.window, self.seq_length + 1),
        )


@dataclass
class PoseSample:
    """One drawn sample layout."""

    token_index: numpy.ndarray
    """int64 [n]: strictly increasing indices into the document, n = min(seq_length, doc_length)."""

    position_ids: numpy.ndarray
    """int64 [n]: strictly increasing position ids, all < target_length."""

    chunk_lengths: numpy.ndarray
    """int64 [k]: the length of each chunk (k = min(num_chunks, n)); sums to n."""


def sample_pose(rng: numpy.random.Generator, doc_length: int, cfg: PoseSampling) -> PoseSample:
    """Draw the token indices and position ids of one PoSE sample from a document of doc_length."""
    doc_length = int(doc_length)
    if doc_length < 1:
        raise ValueError(f"sample_pose needs a document of at least 1 token, got {doc_length}")
    num_tokens = min(cfg.seq_length, doc_length)
    base = numpy.arange(num_tokens, dtype=numpy.int64)  # [n]
    if cfg.is_randpos:
        positions = rng.choice(cfg.target_length, size=num_tokens, replace=False, shuffle=False)
        positions.sort()
        return PoseSample(token_index=base, position_ids=positions.astype(numpy.int64),
                          chunk_lengths=numpy.ones(num_tokens, dtype=numpy.int64))

    max_content_skip = 0  # a short document is used whole and contiguously
    if doc_length >= cfg.seq_length and cfg.content == "skip":
        max_content_skip = min(doc_length, cfg.window) - num_tokens  # L_x - L_c
    max_position_skip = cfg.target_length - num_tokens
    num_chunks = min(cfg.num_chunks, num_tokens)

    chunk_lengths = _draw_chunk_lengths(rng, num_tokens, num_chunks)  # [k]
    position_skips = _draw_sequential_skips(rng, num_chunks, max_position_skip)  # [k]
    content_skips = _draw_sequential_skips(rng, num_chunks, max_content_skip)  # [k]

    if num_chunks == 2:
        # The common case, without materialising per-token repeats.
        l0 = int(chunk_lengths[0])
        position_ids = base.copy()
        position_ids[l0:] += position_skips[1]
        token_index = base
        if content_skips[1]:
            token_index = base.copy()
            token_index[l0:] += content_skips[1]
    else:
        position_ids = base + numpy.repeat(position_skips, chunk_lengths)
        token_index = (
            base + numpy.repeat(content_skips, chunk_lengths) if max_content_skip else base
        )
    return PoseSample(
        token_index=token_index, position_ids=position_ids, chunk_lengths=chunk_lengths
    )


def _draw_chunk_lengths(
    rng: numpy.random.Generator, num_tokens: int, num_chunks: int
) -> numpy.ndarray:
    """Chunk lengths [k] summing to num_tokens, each >= 1."""
    if num_chunks == 1:
        return numpy.array([num_tokens], dtype=numpy.int64)
    if num_chunks == 2:
        # Reference law: the first chunk is never the longer one, l0 ~ U{1 .. ceil(n/2)}.
        l0 = int(rng.integers(1, (num_tokens + 1) // 2 + 1))
        return numpy.array([l0, num_tokens - l0], dtype=numpy.int64)
    if num_chunks == num_tokens:
        return numpy.ones(num_tokens, dtype=numpy.int64)  # every cut point is taken
    # N-1 distinct cut points, uniform over the subsets of 1..n-1.
    cuts = numpy.sort(rng.choice(num_tokens - 1, size=num_chunks - 1, replace=False) + 1)
    bounds = numpy.concatenate(([0], cuts, [num_tokens])).astype(numpy.int64)
    return numpy.diff(bounds)


def _draw_sequential_skips(
    rng: numpy.random.Generator, num_chunks: int, max_skip: int
) -> numpy.ndarray:
    """Skips [k]: 0 for chunk 0, then skip_i ~ U{skip_(i-1) .. max_skip}, one after the other
    (the paper's law; not sorted independent draws, which would be order statistics)."""
    skips = numpy.zeros(num_chunks, dtype=numpy.int64)
    if max_skip > 0:
        previous = 0
        for i in range(1, num_chunks):
            previous = int(rng.integers(previous, max_skip + 1))  # a scalar draw: 4x cheaper
            skips[i] = previous
    return skips
