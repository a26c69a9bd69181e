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


def eval_batches(num_samples: int, batch_size: int, world_size: int,
                 rank: int) -> Iterator[tuple[list[int], int]]:
    """Every evaluation sample exactly once over all ranks (rank r takes r, r + W, ...),
    in the same number of batches of the same size on every rank.

    Under ZeRO-3 each forward pass is a collective (the layers' shards are gathered),
    so a rank with one batch fewer than the others would leave them waiting forever;
    and PPO scores a batch in chunks, so a smaller batch would make fewer passes. A
    rank's batch is therefore filled up to rank 0's (which holds the most samples)
    with copies of sample 0, whose results the caller leaves out.

    Yields:
        (indices, real): sample indices, of which the first `real` count.
    """
    mine = list(range(rank, num_samples, world_size))
    per_rank = -(-num_samples // world_size)  # rank 0's share, the largest
    for i in range(0, per_rank, batch_size):
        real = mine[i:i + batch_size]
        size = min(batch_size, per_rank - i)
        yield real + [0] * (size - len(real)), len(real)


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


def cat_padded(tensors: list[torch.Tensor], value: float | int = 0, side: str = "right") -> torch.Tensor:
    """Concatenate `(B_i, T_i)` tensors along rows, padding each on `side` with `value`
    to the widest one."""
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]) if side == "right"
                                              else (width - t.shape[1], 0), value=value) for t in tensors])


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


def collate_sft_flat(examples: list[dict]) -> dict[str, torch.Tensor]:
    """All samples end to end in one row `(1, N)`, N their total length: no padding.
    `position_ids` restart at every sample (packed examples bring their own), and there
    is no attention mask: FlashAttention-2 then runs each sample as its own sequence
    (variable-length), other backends get a block-diagonal mask from transformers. A
    sample's first token has loss mask 0, so no sample is predicted from the one before."""
    ids = [t for e in examples for t in e["input_ids"]]
    loss_mask = [m for e in examples for m in e["loss_mask"]]
    pos = [p for e in examples for p in e.get("position_ids", range(len(e["input_ids"])))]
    return {"input_ids": torch.tensor([ids]), "attention_mask": None, "loss_mask": torch.tensor([loss_mask]),
            "position_ids": torch.tensor([pos])}


def collate_pairs(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows in one batch `(2B, T)`, so one forward pass scores both."""
    seqs = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    ids = pad(seqs, pad_id)
    attn = pad([[1] * len(s) for s in seqs], 0)
    return {"input_ids": ids, "attention_mask": attn,
            "margin": torch.tensor([e["margin"] for e in examples], dtype=torch.float32)}


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading token ids `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def collate_pairs_shared_prefix(examples: list[dict], pad_id: int, pack: bool = True) -> dict[str, torch.Tensor]:
    """Pairs laid out so that the tokens chosen and rejected share are computed once.

    In a causal model the hidden states of a common prefix (the prompt, and any equal
    leading response tokens) do not depend on what follows, so a pair is one segment
    `prefix + chosen suffix + rejected suffix`, both suffixes positioned right after
    the prefix, with a mask that lets each suffix see the prefix and itself but not
    the other suffix. Scores, and their gradients, are those of the two separate
    sequences; the model just does not compute the prefix twice. With `pack`, segments
    are also placed side by side in rows (first fit, in order, rows as wide as the
    longest segment) and the mask keeps segments apart, so little is spent on padding.

    Returns `input_ids` and `position_ids` `(R, T)`, a boolean `attention_mask`
    `(R, 1, T, T)` (True: may attend), `chosen_index` and `rejected_index` `(B, 2)`
    (row, column of each sequence's last token) and `margin` `(B,)`.
    """
    segments = []  # (ids, positions, branch, chosen_end, rejected_end), ends relative to the segment
    for e in examples:
        c, r = e["chosen_ids"], e["rejected_ids"]
        k = common_prefix_length(c, r)
        cs, rs = c[k:], r[k:]
        ids = c[:k] + cs + rs
        positions = list(range(k)) + list(range(k, len(c))) + list(range(k, len(r)))
        branch = [0] * k + [1] * len(cs) + [2] * len(rs)
        # An empty suffix (one sequence is a prefix of the other) ends on the prefix.
        chosen_end = len(c) - 1
        rejected_end = k + len(cs) + len(rs) - 1 if rs else k - 1
        segments.append((ids, positions, branch, chosen_end, rejected_end))
    width = max(len(s[0]) for s in segments)
    rows: list[list[int]] = []  # segment indices per row
    fill: list[int] = []
    starts = [0] * len(segments)
    for i, seg in enumerate(segments):
        n = len(seg[0])
        row = next((j for j in range(len(rows)) if fill[j] + n <= width), None) if pack else None
        if row is None:
            rows.append([])
            fill.append(0)
            row = len(rows) - 1
        starts[i] = fill[row]
        rows[row].append(i)
        fill[row] += n
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    pos = np.zeros((len(rows), width), dtype=np.int64)
    seg_id = np.full((len(rows), width), -1, dtype=np.int64)  # -1: padding
    branch = np.zeros((len(rows), width), dtype=np.int64)
    chosen_index = np.zeros((len(segments), 2), dtype=np.int64)
    rejected_index = np.zeros((len(segments), 2), dtype=np.int64)
    for r, members in enumerate(rows):
        for i in members:
            seg_ids, seg_pos, seg_branch, c_end, r_end = segments[i]
            a, b = starts[i], starts[i] + len(seg_ids)
            ids[r, a:b], pos[r, a:b], branch[r, a:b], seg_id[r, a:b] = seg_ids, seg_pos, seg_branch, i
            chosen_index[i] = (r, a + c_end)
            rejected_index[i] = (r, a + r_end)
    seg_t, branch_t = torch.from_numpy(seg_id), torch.from_numpy(branch)
    same_segment = (seg_t[:, :, None] == seg_t[:, None, :]) & (seg_t[:, :, None] >= 0)
    visible_branch = (branch_t[:, None, :] == 0) | (branch_t[:, :, None] == branch_t[:, None, :])
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = same_segment & visible_branch & causal
    mask |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty softmax rows
    return {"input_ids": torch.from_numpy(ids), "position_ids": torch.from_numpy(pos),
            "attention_mask": mask[:, None], "chosen_index": torch.from_numpy(chosen_index),
            "rejected_index": torch.from_numpy(rejected_index),
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


def budget_chunks(widths: list[int], budget: int, count: int | None = None) -> list[int]:
    """Split units (rows, or groups of rows) of the given widths in tokens, in order,
    into consecutive chunks that each fit `budget` tokens as the model runs them: a
    rectangle of the chunk's units by its widest unit. Returns how many units each
    chunk takes. A unit wider than the budget is a chunk by itself.

    Without `count`: the fewest chunks (greedy, which is optimal for consecutive
    chunks). With `count` (at least that fewest, at most the number of units): exactly
    `count` chunks, as even as they go: the smallest cap under which the greedy split
    needs at most `count`, then the costliest chunks halved until there are `count`
    (all ranks run one number of micro-batches, the largest any rank needs)."""
    if not widths:
        return []

    def greedy(cap: int) -> list[int]:
        sizes, n, widest = [], 0, 0
        for w in widths:
            if n and (n + 1) * max(widest, w) > cap:
                sizes.append(n)
                n, widest = 0, 0
            n, widest = n + 1, max(widest, w)
        return sizes + [n]

    sizes = greedy(budget)
    if count is None:
        return sizes
    if not len(sizes) <= count <= len(widths):
        raise ValueError(f"{count} chunks: need between {len(sizes)} and {len(widths)} for these {len(widths)} units")
    lo, hi = max(widths), max(budget, max(widths))  # greedy(hi) needs <= count chunks
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(greedy(mid)) <= count else (mid + 1, hi)
    sizes = greedy(lo)
    while len(sizes) < count:
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        cost = [n * max(widths[s:s + n]) if n > 1 else -1 for s, n in zip(starts, sizes)]
        i = cost.index(max(cost))
        sizes[i:i + 1] = [sizes[i] - sizes[i] // 2, sizes[i] // 2]
    return sizes
