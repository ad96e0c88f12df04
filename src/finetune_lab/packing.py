"""How tokenized causal-LM examples become training batches without padding: packed rows and token budgets.

- `PackedRows`: padding-free batches. The examples of a batch are packed into rows of at most `row_tokens`
  tokens, each row flattened by transformers' `DataCollatorWithFlattening`: `position_ids` restart at every
  example, from which transformers builds a block-diagonal causal mask, so no token attends across examples;
  the first label of every example is ignored, so no example predicts the next one's first token. The loss
  therefore means what it means with padding: the mean over the same target tokens.
  Rows, not one flat sequence, because SDPA materialises a dense mask per row: its cost grows with the square
  of the row length, so a 16k-token batch as one row would spend most of its time on masked-out attention.
- `TokenBudgetBatchSampler`: batches of up to `max_tokens` tokens instead of a fixed number of examples.

Forwards outside the Trainer must pass `use_cache=False`: with a cache, transformers does not look for packed
sequences and lets every token attend to the whole row.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler
from transformers import DataCollatorWithFlattening

from finetune_lab.prompts import IGNORE_INDEX


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` in bins whose lengths sum to at most `capacity`: the longest first, each into the bin
    it fills best (a new one when none has room). Deterministic; O(n log n) searches."""
    bins: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, bin), sorted
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        position = bisect.bisect_left(rooms, (lengths[index], -1))
        if position == len(rooms):
            bins.append([index])
            room, target = capacity - lengths[index], len(bins) - 1
        else:
            room, target = rooms.pop(position)
            bins[target].append(index)
            room -= lengths[index]
        bisect.insort(rooms, (room, target))
    return bins


def next_fit_decreasing_padded(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` in batches whose padded size (examples x longest) stays within `capacity`: the
    longest first, so each batch holds examples of similar length."""
    batches: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= capacity:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


class PackedRows:
    """Collator: the batch's examples packed into rows of at most `row_tokens` tokens (see the module doc).
    Rows shorter than the longest are filled with pad tokens that form a block of their own (label ignored):
    no attention mask is returned, since with one transformers would not detect the packed sequences."""

    def __init__(self, pad_token_id: int, row_tokens: int):
        self.pad_token_id = pad_token_id
        self.row_tokens = row_tokens
        self.flatten = DataCollatorWithFlattening()

    def layout(self, lengths: Sequence[int]) -> list[list[int]]:
        """Which of the batch's examples (by their `lengths`, in the batch's order) each row holds, in the order
        they follow each other in it."""
        return best_fit_decreasing(lengths, self.row_tokens)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        rows = [self.flatten([features[i] for i in row]) for row in self.layout(lengths)]
        width = max(row["input_ids"].shape[1] for row in rows)
        filled = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}
        batch: dict[str, list[torch.Tensor]] = {"input_ids": [], "labels": [], "position_ids": []}
        for row in rows:
            missing = width - row["input_ids"].shape[1]
            for key, value in filled.items():
                batch[key].append(torch.cat([row[key][0], torch.full((missing,), value, dtype=torch.long)]))
            batch["position_ids"].append(torch.cat([row["position_ids"][0], torch.arange(missing)]))
        return {key: torch.stack(values) for key, values in batch.items()}


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices holding at most `max_tokens` tokens each: real tokens when the batch is packed,
    examples x longest when it is padded. The batches are made once (longest examples first, so examples of
    similar length share a batch), so every epoch has the same number of steps; each epoch shuffles
    their order with `seed` + epoch. For a single process."""

    def __init__(self, lengths: Sequence[int], max_tokens: int, packed: bool, seed: int):
        if max(lengths) > max_tokens:
            raise ValueError(f"an example has {max(lengths)} tokens, more than the budget of {max_tokens}")
        make = best_fit_decreasing if packed else next_fit_decreasing_padded
        self.batches = make(lengths, max_tokens)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by accelerate's dataloader at the start of every epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        batches = list(self.batches)
        random.Random(self.seed + self.epoch).shuffle(batches)
        yield from batches

    def __len__(self) -> int:
        return len(self.batches)
