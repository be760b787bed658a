"""From .bin/.idx prefixes to micro-batches: PoseGPTDatasets through megatron-core's builder (splits,
blends, index caches), then one data-parallel rank's micro-batches in Megatron's order, resumable by
consumed samples."""

from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split

from pose_megatron.data import PoseGPTDataset, PoseGPTDatasetConfig
from pose_megatron.data_checks import check_token_range
from pose_megatron.positions import PoseSampling


class MicroBatchSampler:
    """Index lists of one rank's micro-batches.

    Global sample order is 0, 1, 2, ...; each step of micro_batch_size x dp_size consecutive samples
    is split by data-parallel rank, as Megatron-LM's pretraining sampler does. Starting at
    `consumed_samples` resumes exactly where an interrupted run stopped.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in 0..{dp_size - 1}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def __len__(self) -> int:
        step = self.micro_batch_size * self.dp_size
        return max(0, (self.total_samples - self.consumed_samples) // step)

    def __iter__(self) -> Iterator[List[int]]:
        step = self.micro_batch_size * self.dp_size
        for start in range(self.consumed_samples, self.total_samples - step + 1, step):
            first = start + self.dp_rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))


def build_data_iterator(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                        dp_size: int, num_workers: int = 0) -> Iterator[dict]:
    """An iterator of collated micro-batches {tokens, labels, loss_mask, position_ids: [b, s]}."""
    sampler = MicroBatchSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
    return iter(loader)


def build_pose_datasets(
    data_prefixes: Sequence[str],
    data_weights: Optional[Sequence[float]],
    split: str,
    sizes: Sequence[Optional[int]],
    seed: int,
    tokenizer,
    pose: PoseSampling,
    *,
    min_doc_length: Optional[int] = None,
    path_to_cache: Optional[str] = None,
    eod_mask_loss: bool = False,
    create_attention_mask: bool = False,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
) -> Tuple[Optional[torch.utils.data.Dataset], ...]:
    """(train, valid, test) PoseGPTDatasets (blended when there are several prefixes).

    data_prefixes are .bin/.idx prefixes, data_weights their blend weights (None: by size), split a
    Megatron split string such as "98,1,1", sizes the samples wanted per split (None: one epoch).
    Megatron's "w1 p1 w2 p2" lists convert with megatron.core.datasets.utils.get_blend_from_list.
    """
    if not data_prefixes:
        raise ValueError(
            "build_pose_datasets needs at least one data prefix; for a quick start use "
            "pose_megatron.corpus.ensure_sample_corpus() and pass its train_prefix"
        )
    for prefix in data_prefixes:
        if not IndexedDataset.exists(prefix):
            raise FileNotFoundError(
                f"no {prefix}.bin/.idx pair; run tools/preprocess_data.py to create it"
            )
    if data_weights is not None and len(data_weights) != len(data_prefixes):
        raise ValueError(
            f"{len(data_weights)} data weights for {len(data_prefixes)} data prefixes; give one "
            f"weight per prefix or none"
        )
    if len(sizes) != len(Split):
        raise ValueError(f"sizes needs one entry per split (train, valid, test), got {list(sizes)}")
    if data_weights is not None and any(size is None for size in sizes):
        raise ValueError(
            f"with data_weights every split needs a sample count (0 for an unused split), got "
            f"sizes={list(sizes)}; megatron-core blends by weight only toward a known size"
        )
    # megatron-core 0.16's BlendedDataset calls torch.distributed.get_rank() whenever it has a
    # path_to_cache; a single process without a process group keeps the PoSE index cache and lets
    # the blend index (a fast C++ pass) be built in memory.
    blend_cache = path_to_cache
    if len(data_prefixes) > 1 and not torch.distributed.is_initialized():
        blend_cache = None
    # Truncated or empty files and foreign token ids fail here, naming the file, not in a step.
    summaries = check_token_range(data_prefixes, tokenizer.vocab_size, path_to_cache)
    config = PoseGPTDatasetConfig(
        check_token_ids=any(s.max_token is None for s in summaries.values()),
        random_seed=seed,
        sequence_length=pose.seq_length,
        blend=(list(data_prefixes), None if data_weights is None else list(data_weights)),
        split=split,
        path_to_cache=blend_cache,
        pose_index_cache_path=path_to_cache,
        tokenizer=tokenizer,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
        pose=pose,
        min_doc_length=min_doc_length,
    )
    builder = BlendedMegatronDatasetBuilder(
        PoseGPTDataset, list(sizes), is_built_on_rank or (lambda: True), config
    )
    train, valid, test = builder.build()
    return train, valid, test
