"""Micro-batches for one data-parallel rank, in Megatron's order, resumable by consumed samples."""

from __future__ import annotations

from typing import Iterator, List

import torch


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
