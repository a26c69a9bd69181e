"""Batches: which samples each rank sees at each optimizer step, packing, and padding.

The order of samples is a pure function of (seed, epoch), and each optimizer step
takes the next `global_batch_size` of them, split across ranks and micro-batches.
So the samples of step k are the same on 1 rank or 8, with or without gradient
accumulation, and resuming at step k needs nothing but k.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


class StepSampler:
    """Indices of the samples of every optimizer step, for one rank.

    Args:
        num_samples: size of the training set.
        global_batch_size: samples per optimizer step (all ranks, all micro-batches).
        micro_batch_size: samples per forward pass on one rank.
        world_size, rank: data-parallel layout.
        seed: the order of epoch e is a permutation drawn from (seed, e).
    """

    def __init__(self, num_samples: int, global_batch_size: int, micro_batch_size: int,
                 world_size: int, rank: int, seed: int, shuffle: bool = True):
        if num_samples < global_batch_size:
            raise ValueError(f"the training set has {num_samples} samples, fewer than one global batch "
                             f"({global_batch_size}); lower train.global_batch_size or add data")
        self.n = num_samples
        self.global_batch_size = global_batch_size
        self.micro = micro_batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        # The incomplete last batch of an epoch is dropped: every step has the same size.
        self.steps_per_epoch = num_samples // global_batch_size
        self._epoch = -1
        self._order: list[int] = []

    def order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
                self._order = torch.randperm(self.n, generator=g).tolist()
            else:
                self._order = list(range(self.n))
            self._epoch = epoch
        return self._order

    def step(self, step: int) -> list[list[int]]:
        """This rank's micro-batches (lists of sample indices) for optimizer step `step`."""
        epoch, k = divmod(step, self.steps_per_epoch)
        batch = self.order(epoch)[k * self.global_batch_size:(k + 1) * self.global_batch_size]
        per_rank = self.global_batch_size // self.world_size
        mine = batch[self.rank * per_rank:(self.rank + 1) * per_rank]
        return [mine[i:i + self.micro] for i in range(0, per_rank, self.micro)]


def eval_batches(num_samples: int, batch_size: int, world_size: int, rank: int) -> Iterator[list[int]]:
    """Every evaluation sample exactly once over all ranks (rank r takes r, r + W, ...)."""
    mine = list(range(rank, num_samples, world_size))
    for i in range(0, len(mine), batch_size):
        yield mine[i:i + batch_size]


def pad(seqs: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    """Stack int lists into `(B, max_len)`, padding each row on `side` with `value`."""
    width = max(len(s) for s in seqs)
    out = np.full((len(seqs), width), value, dtype=np.int64)  # numpy fills rows without a tensor per row
    for i, s in enumerate(seqs):
        if side == "right":
            out[i, :len(s)] = s
        else:
            out[i, width - len(s):] = s
    return torch.from_numpy(out)


def collate_sft(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask`, `loss_mask`, `position_ids`, shapes `(B, T)`.

    Packed examples carry their own `position_ids` (restarting at every sample) and
    get no attention mask: transformers then derives a block-diagonal causal mask
    from the positions, so no token attends across a sample boundary.
    """
    ids = pad([e["input_ids"] for e in examples], pad_id)
    loss_mask = pad([e["loss_mask"] for e in examples], 0)
    if "position_ids" in examples[0]:
        # Padding continues the last sample's positions: causal attention keeps real
        # tokens blind to it, and its loss mask is 0.
        pos = [e["position_ids"] + list(range(e["position_ids"][-1] + 1,
                                              e["position_ids"][-1] + 1 + ids.shape[1] - len(e["input_ids"])))
               for e in examples]
        return {"input_ids": ids, "attention_mask": None, "loss_mask": loss_mask,
                "position_ids": torch.tensor(pos, dtype=torch.long)}
    attn = pad([[1] * len(e["input_ids"]) for e in examples], 0)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask,
            "position_ids": (attn.cumsum(-1) - 1).clamp(min=0)}


def collate_pairs(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows in one batch `(2B, T)`, so one forward pass scores both."""
    seqs = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    ids = pad(seqs, pad_id)
    attn = pad([[1] * len(s) for s in seqs], 0)
    return {"input_ids": ids, "attention_mask": attn,
            "margin": torch.tensor([e["margin"] for e in examples], dtype=torch.float32)}


def collate_prompts(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts `(B, P)` for generation: every row's last prompt token is at
    the same column, so generated tokens line up."""
    ids = pad([e["prompt_ids"] for e in examples], pad_id, side="left")
    attn = pad([[1] * len(e["prompt_ids"]) for e in examples], 0, side="left")
    return {"input_ids": ids, "attention_mask": attn}


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Greedily concatenate SFT examples (in the given order) into sequences of at most
    `max_length` tokens, each with `position_ids` restarting at every sample."""
    packed: list[dict] = []
    cur: dict[str, list[int]] = {"input_ids": [], "loss_mask": [], "position_ids": []}
    for e in examples:
        n = len(e["input_ids"])
        if cur["input_ids"] and len(cur["input_ids"]) + n > max_length:
            packed.append(cur)
            cur = {"input_ids": [], "loss_mask": [], "position_ids": []}
        cur["input_ids"] += e["input_ids"]
        cur["loss_mask"] += e["loss_mask"]
        cur["position_ids"] += list(range(n))
    if cur["input_ids"]:
        packed.append(cur)
    return packed
