"""PoseGPTDataset: megatron-core's GPTDataset with PoSE samples (pose_megatron.loader builds them).

GPTDataset packs documents end to end into seq_length+1 token runs. PoSE instead cuts every
sample from ONE document window with pose_megatron.positions.sample_pose, so this subclass replaces
the index (which window each sample reads) and `__getitem__` (which tokens, which positions).
Everything around it is megatron-core's: IndexedDataset for .bin/.idx, BlendedMegatronDatasetBuilder
for splits and blends, BlendedDataset, and the on-disk index cache (keyed by the PoSE settings too).

Index layout (cached as .npy next to the data or under path_to_cache, megatron-core's file names):
- document_index  int32 [D]      the documents kept (>= min_doc_length tokens) in this split
- sample_index    int64 [S, 3]   (document id, window start, window length) per sample, by epoch
- shuffle_index   int64 [S]      a permutation applied epoch by epoch (every window once per epoch)
A document of n tokens has max(1, n // W) windows of W = content window tokens, one sample each.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split
from megatron.core.utils import log_single_rank

from pose_megatron.data_checks import check_sample_tokens, fingerprint
from pose_megatron.files import atomic_write_bytes, atomic_write_text
from pose_megatron.positions import PoseSampling, sample_pose

logger = logging.getLogger(__name__)


@dataclass
class PoseGPTDatasetConfig(GPTDatasetConfig):
    """GPTDatasetConfig plus the PoSE sampling settings.

    The three GPTDatasetConfig flags that megatron-core requires explicitly default to False here: a
    PoSE sample never crosses a document boundary, so there is nothing to reset.
    """

    reset_position_ids: Optional[bool] = False
    """Must stay False: positions come from the PoSE sampler (a sample holds one document)."""

    reset_attention_mask: Optional[bool] = False
    """Must stay False: a sample holds one document, so plain causal attention is the mask."""

    eod_mask_loss: Optional[bool] = False
    """Mask the loss where the input token is EOD (as in GPTDataset)."""

    create_attention_mask: bool = False
    """Return the [1, s, s] causal mask; off by default because attention kernels build it."""

    pose: Optional[PoseSampling] = None
    """The PoSE sampling settings; pose.seq_length must equal sequence_length."""

    min_doc_length: Optional[int] = None
    """Documents shorter than this many tokens are skipped (`--pose-min-doc-length`); None means
    sequence_length + 1, so every sample is full length, as the paper filtered its data."""

    check_token_ids: bool = False
    """Check every sample's token ids against the tokenizer's vocabulary: for data whose token
    range is unknown (no sidecar, too large to scan; see pose_megatron/data_checks.py)."""

    pose_index_cache_path: Optional[str] = None
    """Where PoseGPTDataset caches its indices; None means path_to_cache, or next to the data when
    that is None too. Lets a single process cache PoSE indices while BlendedDataset, which needs
    torch.distributed to use path_to_cache, builds its cheap index in memory."""

    def __post_init__(self) -> None:
        if self.pose is None:
            raise ValueError(
                "PoseGPTDatasetConfig.pose is required: pass "
                "pose=PoseSampling(seq_length=..., target_length=...)"
            )
        if self.pose.seq_length != self.sequence_length:
            raise ValueError(
                f"PoseGPTDatasetConfig.pose.seq_length ({self.pose.seq_length}) must equal "
                f"sequence_length ({self.sequence_length})"
            )
        for flag in ("reset_position_ids", "reset_attention_mask"):
            if getattr(self, flag):
                raise ValueError(
                    f"PoseGPTDatasetConfig.{flag} must be False: a PoSE sample holds one document, "
                    f"so there is no document boundary to reset at"
                )
        if not self.add_extra_token_to_sequence:
            raise ValueError(
                "PoseGPTDatasetConfig.add_extra_token_to_sequence must be True: a PoSE sample "
                "always draws seq_length+1 (token, position) pairs for inputs and labels"
            )
        if self.defer_npy_index_mmap:
            raise ValueError(
                "PoseGPTDatasetConfig.defer_npy_index_mmap is not supported: the sample count is "
                "only known after the min_doc_length filter; leave it False"
            )
        super().__post_init__()
        if self.min_doc_length is None:
            self.min_doc_length = self.sequence_length + 1
        elif self.min_doc_length < 1:
            raise ValueError(
                f"PoseGPTDatasetConfig.min_doc_length must be >= 1 (or None for "
                f"sequence_length+1), got {self.min_doc_length}"
            )

    @property
    def data_fingerprints(self) -> Dict[str, list]:
        """(size, mtime) of every .bin/.idx this config reads: part of the index cache key, so a
        prefix rebuilt with other documents never reuses the old corpus's windows."""
        prefixes = list(self.blend[0]) if self.blend else []
        for blend in self.blend_per_split or []:
            prefixes += list(blend[0]) if blend else []
        return {prefix: fingerprint(prefix) for prefix in sorted(set(prefixes))}

    @property
    def pose_identifiers(self) -> Dict[str, object]:
        """The PoSE settings as plain values, for the index cache key."""
        return {
            "seq_length": self.pose.seq_length,
            "target_length": self.pose.target_length,
            "num_chunks": self.pose.num_chunks,
            "content": self.pose.content,
            "content_window": self.pose.window,
        }


def _philox_key(seed: int, index: int) -> numpy.ndarray:
    return numpy.array([int(seed) % 2**64, int(index) % 2**64], dtype=numpy.uint64)  # [2]


def make_sample_rng(seed: int, index: int) -> numpy.random.Generator:
    """The generator of sample `index`: a counter-based Philox stream keyed by (seed, index) only,
    so every rank, every loader worker and every resumed run draws the same layout for a sample."""
    return numpy.random.Generator(numpy.random.Philox(key=_philox_key(seed, index)))


class _SampleRngs:
    """make_sample_rng without its construction cost: one Philox, re-keyed per sample.

    Building a Philox runs SeedSequence (about 9 us, a sixth of a 4096-token sample); writing the
    key and a zero counter into an existing one (about 1.6 us) yields the identical stream.
    """

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._bit_generator = numpy.random.Philox(key=_philox_key(seed, 0))
        self._generator = numpy.random.Generator(self._bit_generator)
        self._fresh = self._bit_generator.state  # counter 0, empty buffers

    def __call__(self, index: int) -> numpy.random.Generator:
        state = dict(self._fresh)
        state["state"] = {
            "counter": self._fresh["state"]["counter"],
            "key": _philox_key(self._seed, index),
        }
        self._bit_generator.state = state
        return self._generator


class PoseGPTDataset(GPTDataset):
    """A GPTDataset whose samples are PoSE layouts of single document windows.

    Each sample draws seq_length+1 (token, position) pairs with sample_pose: tokens and position_ids
    are the first seq_length pairs, labels the last seq_length tokens, so the token after a chunk
    boundary is predicted too, as in the reference.
    """

    def __init__(
        self,
        indexed_dataset: IndexedDataset,
        dataset_path: Optional[str],
        indexed_indices: numpy.ndarray,
        num_samples: Optional[int],
        index_split: Split,
        config: PoseGPTDatasetConfig,
    ) -> None:
        if not isinstance(config, PoseGPTDatasetConfig):
            raise TypeError(
                f"PoseGPTDataset needs a PoseGPTDatasetConfig, got {type(config).__name__}"
            )
        # One extra pair for the labels; its window keeps the content law of config.pose.
        self.sampling = config.pose.with_extra_token()
        self.num_documents_total = self.num_documents_kept = 0
        self.num_tokens_total = self.num_tokens_kept = 0
        self._causal_mask: Optional[torch.Tensor] = None
        super().__init__(
            indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config
        )
        self._rngs = _SampleRngs(int(config.random_seed))

    @staticmethod
    def _key_config_attributes() -> List[str]:
        return GPTDataset._key_config_attributes() + ["pose_identifiers", "min_doc_length",
                                                      "data_fingerprints"]

    def __len__(self) -> int:
        return int(self.sample_index.shape[0])

    def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
        """tokens, labels, position_ids (int64 [s]) and loss_mask (float32 [s]) of sample idx.

        idx None is megatron-core's batch padding: sample 0 with the loss masked.
        """
        index = 0 if idx is None else int(idx)
        if index < 0:
            index += len(self)
        doc_id, start, length = self.sample_index[self.shuffle_index[index]]
        layout = sample_pose(self._rngs(index), length, self.sampling)
        token_index = layout.token_index  # [n], n = min(s + 1, window length)
        # Read only up to the last needed token (a view into the memory-mapped .bin).
        window = self.dataset.get(int(doc_id), offset=int(start), length=int(token_index[-1]) + 1)
        text = window[token_index].astype(numpy.int64)  # [n]
        if self.config.check_token_ids:
            check_sample_tokens(text, self.config.tokenizer.vocab_size, self.dataset_path, int(doc_id))
        positions = layout.position_ids  # [n]

        seq_length = self.config.sequence_length
        num_inputs = text.size - 1
        if num_inputs == seq_length:
            tokens = torch.from_numpy(text[:-1])
            labels = torch.from_numpy(text[1:].copy())
            position_ids = torch.from_numpy(positions[:-1])
            loss_mask = torch.ones(seq_length, dtype=torch.float32)
        else:
            # A document shorter than seq_length+1: pad with token 0 and mask the loss there. Padded
            # slots repeat the last real position so no position id ever reaches target_length.
            tokens = torch.zeros(seq_length, dtype=torch.int64)
            labels = torch.zeros(seq_length, dtype=torch.int64)
            position_ids = torch.full(
                (seq_length,), int(positions[max(num_inputs - 1, 0)]), dtype=torch.int64
            )
            loss_mask = torch.zeros(seq_length, dtype=torch.float32)
            tokens[:num_inputs] = torch.from_numpy(text[:-1])
            labels[:num_inputs] = torch.from_numpy(text[1:])
            position_ids[:num_inputs] = torch.from_numpy(positions[:-1])
            loss_mask[:num_inputs] = 1.0

        if self.config.eod_mask_loss:
            loss_mask[tokens == self.config.tokenizer.eod] = 0.0
        if idx is None:
            loss_mask.zero_()

        sample = {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": loss_mask,
            "position_ids": position_ids,
        }
        if self.config.create_attention_mask:
            sample["attention_mask"] = self._get_causal_mask()
        return sample

    def _get_causal_mask(self) -> torch.Tensor:
        """[1, s, s] bool, True where attention is blocked (megatron-core's convention)."""
        if self._causal_mask is None:
            s = self.config.sequence_length
            self._causal_mask = ~torch.tril(torch.ones((s, s), dtype=torch.bool)).unsqueeze(0)
        return self._causal_mask

    # ---- the index -------------------------------------------------------------------------------

    def _build_document_sample_shuffle_indices(
        self,
    ) -> Tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
        """Build (or load from the cache) the document, sample and shuffle indices."""
        self._count_kept_documents()
        path_to_cache = self.config.pose_index_cache_path or self.config.path_to_cache
        if path_to_cache is None:
            path_to_cache = os.path.join(
                self.dataset.path_prefix, "cache", f"{type(self).__name__}_indices"
            )
        base = f"{self.unique_description_hash}-{type(self).__name__}-{self.index_split.name}"
        paths = {
            name: os.path.join(path_to_cache, f"{base}-{name}")
            for name in (
                "description.txt",
                "document_index.npy",
                "sample_index.npy",
                "shuffle_index.npy",
            )
        }
        cache_hit = self.config.fast_cache_load or all(map(os.path.isfile, paths.values()))
        is_builder_rank = (
            not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        )

        if cache_hit or not is_builder_rank:
            # Other ranks load what rank 0 wrote (BlendedMegatronDatasetBuilder barriers between).
            log_single_rank(logger, logging.INFO, f"Load the {base} indices from {path_to_cache}")
            document_index, sample_index, shuffle_index = (
                numpy.load(paths[name], allow_pickle=False, mmap_mode="r")
                for name in ("document_index.npy", "sample_index.npy", "shuffle_index.npy")
            )
        else:
            document_index, sample_index, shuffle_index = self._build_indices()
            _save_indices_atomically(
                paths,
                self.unique_description,
                {
                    "document_index.npy": document_index,
                    "sample_index.npy": sample_index,
                    "shuffle_index.npy": shuffle_index,
                },
            )
        log_single_rank(
            logger,
            logging.INFO,
            f"> {type(self).__name__} {self.index_split.name}: {sample_index.shape[0]} samples",
        )
        return document_index, sample_index, shuffle_index

    def _count_kept_documents(self) -> None:
        """Apply the min_doc_length filter and report what it keeps."""
        if self.indices is None:  # fast_cache_load hands no document list; the cache has it
            return
        lengths = self.dataset.sequence_lengths[self.indices].astype(numpy.int64)  # [D]
        keep = lengths >= self.config.min_doc_length
        self._kept_documents = self.indices[keep].astype(numpy.int32)  # [D_kept]
        self._kept_lengths = lengths[keep]  # [D_kept]
        self.num_documents_total, self.num_tokens_total = int(lengths.size), int(lengths.sum())
        self.num_documents_kept = int(self._kept_documents.size)
        self.num_tokens_kept = int(self._kept_lengths.sum())
        log_single_rank(
            logger,
            logging.INFO,
            f"> {type(self).__name__} {self.index_split.name} ({self.dataset_path}): kept "
            f"{self.num_documents_kept} of {self.num_documents_total} documents and "
            f"{self.num_tokens_kept} of {self.num_tokens_total} tokens "
            f"(documents of >= {self.config.min_doc_length} tokens)",
        )

    def _build_indices(self) -> Tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
        documents, lengths = self._kept_documents, self._kept_lengths
        window = self.sampling.window
        windows_per_doc = numpy.maximum(1, lengths // window)  # [D_kept]
        per_epoch = int(windows_per_doc.sum())
        if per_epoch == 0:
            if self.num_samples:
                longest = int(self.dataset.sequence_lengths[self.indices].max(initial=0))
                raise ValueError(
                    f"{type(self).__name__} {self.index_split.name} split of {self.dataset_path}: "
                    f"no document has >= min_doc_length={self.config.min_doc_length} tokens "
                    f"({self.num_documents_total} documents, the longest {longest} tokens), but "
                    f"{self.num_samples} samples were requested; lower --pose-min-doc-length or "
                    f"--seq-length, or add longer documents"
                )
            log_single_rank(logger, logging.WARNING, f"{self.index_split.name} split is empty")
        num_epochs = 1
        if self.num_samples and per_epoch:
            num_epochs = max(1, math.ceil(self.num_samples / per_epoch))

        # One epoch: window k of document d starts at k * W and holds min(W, n_d - k * W) tokens.
        doc_of_sample = numpy.repeat(documents.astype(numpy.int64), windows_per_doc)  # [S_e]
        first_sample = numpy.cumsum(windows_per_doc) - windows_per_doc  # [D_kept]
        window_number = numpy.arange(per_epoch) - numpy.repeat(first_sample, windows_per_doc)
        starts = window_number * window  # [S_e]
        sizes = numpy.minimum(window, numpy.repeat(lengths, windows_per_doc) - starts)  # [S_e]
        epoch = numpy.stack([doc_of_sample, starts, sizes], axis=1)  # [S_e, 3]
        sample_index = numpy.tile(epoch, (num_epochs, 1))  # [S, 3]

        rng = numpy.random.default_rng([int(self.config.random_seed), self.index_split.value])
        shuffle_index = numpy.concatenate(
            [e * per_epoch + rng.permutation(per_epoch) for e in range(num_epochs)]
        ).astype(numpy.int64)  # [S]
        log_single_rank(
            logger,
            logging.INFO,
            f"> {per_epoch} windows of <= {window} tokens per epoch, {num_epochs} epoch(s)",
        )
        return documents, sample_index, shuffle_index


def _save_indices_atomically(
    paths: Dict[str, str], description: str, arrays: Dict[str, numpy.ndarray]
) -> None:
    """Write each cache file atomically; the description goes last, so a cache that has all four
    files is complete."""
    os.makedirs(os.path.dirname(paths["description.txt"]), exist_ok=True)
    for name, array in arrays.items():
        buffer = io.BytesIO()
        numpy.save(buffer, array, allow_pickle=False)
        atomic_write_bytes(paths[name], buffer.getvalue())
    atomic_write_text(paths["description.txt"], description)
