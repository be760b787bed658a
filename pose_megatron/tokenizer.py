"""Tokenizers in the shape megatron-core's datasets expect.

megatron-core's GPTDataset reads `vocab_size`, `eod` and `unique_identifiers` (the latter goes into
the index cache key); preprocessing needs `tokenize` and `bos`; evaluation and tests `detokenize`.
Two backends: a sentencepiece model file (LLaMA, Baichuan, the bundled sample corpus) and a Hugging
Face tokenizer directory. Both pickle by path, so DataLoader and preprocessing workers rebuild them.

No `pad` attribute on purpose: megatron-core then pads with -1, an id that can never collide with a
real token, and masks the loss there.
"""

from __future__ import annotations

import abc
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Type

import numpy

logger = logging.getLogger(__name__)


class _PoseTokenizer(abc.ABC):
    """Common surface of the backends; subclasses fill `_open` and the token ids."""

    tokenizer_type = ""

    def __init__(self, tokenizer_model: str) -> None:
        self.tokenizer_model = str(tokenizer_model)
        self._load()
        self.unique_identifiers = OrderedDict(
            [
                ("class", type(self).__name__),
                ("tokenizer_path", [os.path.abspath(self.tokenizer_model)]),
                ("vocab_size", self.vocab_size),
            ]
        )

    is_directory = False
    """Whether this backend's tokenizer_model is a directory (else a file)."""
    path_hint = ""
    """What to pass instead, for error messages."""

    def _load(self) -> None:
        """Check the path, open the backend (`_open`) and check it has an end-of-document id; every
        failure is a FileNotFoundError / ValueError naming what was given and what is needed."""
        path, kind = self.tokenizer_model, "directory" if self.is_directory else "file"
        if not os.path.exists(path):
            raise FileNotFoundError(f"{self.tokenizer_type} tokenizer {path!r} does not exist; "
                                    f"{self.path_hint}")
        if os.path.isdir(path) != self.is_directory:
            raise ValueError(f"{self.tokenizer_type} tokenizer {path!r} is not a {kind}; {self.path_hint}")
        try:
            self._open()
        except (RuntimeError, OSError, ValueError) as err:
            raise ValueError(f"cannot read {path!r} as a {self.tokenizer_type} tokenizer ({err}); "
                             f"is it complete? {self.path_hint}") from None
        if self._eod_or_none() is None:
            raise ValueError(f"{self.tokenizer_type} tokenizer {path!r} has no end-of-sequence token, "
                             "so there is no end-of-document id; give it one (sentencepiece: "
                             "eos_id >= 0; Hugging Face: eos_token in tokenizer_config.json)")

    @abc.abstractmethod
    def _open(self) -> None:
        """Load the backend object from self.tokenizer_model (raises on unreadable input)."""

    @abc.abstractmethod
    def _eod_or_none(self) -> Optional[int]:
        ...

    # Pickle by path: backend objects are either unpicklable or large.
    def __getstate__(self) -> Dict[str, str]:
        return {"tokenizer_model": self.tokenizer_model}

    def __setstate__(self, state: Dict[str, str]) -> None:
        self.__init__(state["tokenizer_model"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.tokenizer_model!r}, vocab_size={self.vocab_size})"

    @abc.abstractmethod
    def tokenize(self, text: str) -> List[int]:
        """Token ids of `text`, without BOS/EOD (preprocessing adds those when asked)."""
        ...

    def tokenize_array(self, text: str) -> numpy.ndarray:
        """tokenize() as an integer array [n]; backends that can skip the Python list do."""
        ids = self.tokenize(text)
        return numpy.fromiter(ids, dtype=numpy.int64, count=len(ids))

    @abc.abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """The text of token ids (the inverse of tokenize for lossless tokenizers)."""
        ...

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        ...

    @property
    @abc.abstractmethod
    def eod(self) -> int:
        """The end-of-document id appended by `--append-eod` (the tokenizer's EOS)."""
        ...

    @property
    @abc.abstractmethod
    def bos(self) -> Optional[int]:
        """The beginning-of-sequence id prepended by `--prepend-bos`, or None when there is none."""
        ...

    @property
    def eos(self) -> int:
        return self.eod


class SentencePieceTokenizer(_PoseTokenizer):
    """A sentencepiece `.model` file."""

    tokenizer_type = "sentencepiece"

    path_hint = ("pass the '.model' file (e.g. tokenizer.model of a LLaMA checkpoint); for a "
                 "Hugging Face tokenizer directory use --tokenizer-type huggingface")

    def _open(self) -> None:
        import sentencepiece

        self._processor = sentencepiece.SentencePieceProcessor(model_file=self.tokenizer_model)
        # sentencepiece >= 0.2.1 returns arrays directly, 20% faster than a list of Python ints.
        try:
            self._processor.encode("", return_type="numpy")
            self._numpy_output = True
        except (TypeError, ValueError):
            self._numpy_output = False

    def _eod_or_none(self) -> Optional[int]:
        return self._processor.eos_id() if self._processor.eos_id() >= 0 else None

    def tokenize(self, text: str) -> List[int]:
        return self._processor.encode(text)

    def tokenize_array(self, text: str) -> numpy.ndarray:
        if self._numpy_output:
            return self._processor.encode(text, return_type="numpy")  # int32 [n]
        return super().tokenize_array(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._processor.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    @property
    def eod(self) -> int:
        return self._processor.eos_id()

    @property
    def bos(self) -> Optional[int]:
        bos = self._processor.bos_id()
        return bos if bos >= 0 else None


class HuggingFaceTokenizer(_PoseTokenizer):
    """A local Hugging Face tokenizer directory (anything `AutoTokenizer.from_pretrained` loads)."""

    tokenizer_type = "huggingface"

    is_directory = True
    path_hint = ("pass a local directory holding tokenizer.json / tokenizer_config.json (no "
                 "downloads here); for a sentencepiece '.model' file use --tokenizer-type sentencepiece")

    def _open(self) -> None:
        import transformers

        self._tokenizer = transformers.AutoTokenizer.from_pretrained(self.tokenizer_model)

    def _eod_or_none(self) -> Optional[int]:
        return self._tokenizer.eos_token_id

    def tokenize(self, text: str) -> List[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], clean_up_tokenization_spaces=False)

    @property
    def vocab_size(self) -> int:
        # len() includes added tokens, which the embedding table must cover.
        return len(self._tokenizer)

    @property
    def eod(self) -> int:
        return self._tokenizer.eos_token_id

    @property
    def bos(self) -> Optional[int]:
        return self._tokenizer.bos_token_id


TOKENIZER_TYPES: Dict[str, Type[_PoseTokenizer]] = {
    "sentencepiece": SentencePieceTokenizer,
    "huggingface": HuggingFaceTokenizer,
}
"""`--tokenizer-type` values and their classes."""


def build_tokenizer(tokenizer_type: str, tokenizer_model: str) -> _PoseTokenizer:
    """The tokenizer of `tokenizer_type` (one of TOKENIZER_TYPES) loaded from `tokenizer_model`."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(
            f"unknown tokenizer_type {tokenizer_type!r}; choose one of {sorted(TOKENIZER_TYPES)}"
        )
    tokenizer = TOKENIZER_TYPES[tokenizer_type](tokenizer_model)
    logger.debug("built %r", tokenizer)
    return tokenizer


def token_dtype(vocab_size: int) -> type:
    """The narrowest .bin dtype for ids below vocab_size (uint16 saves half the disk and I/O)."""
    return numpy.uint16 if vocab_size <= numpy.iinfo(numpy.uint16).max + 1 else numpy.int32
