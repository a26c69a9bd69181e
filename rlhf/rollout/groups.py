"""The shared-prefix layout of a group: a prompt's G responses scored after one copy of it.

A rollout batch with rollout.n = G holds G consecutive rows per prompt, each the prompt
then a response (rlhf.rollout.hf). Laid out as one row per group, the prompt's tokens
go through the model once instead of G times, and no padding goes through at all:
the row is the prompt's real tokens, then each response's, back to back (packed), then
padding up to the longest row of the batch:

    input_ids     [ p p p | r r EOS | r r r r | ... | r EOS | pad pad ]
                    prompt  response 1  response 2      response G
    position_ids  [ 0 1 2 | 3 4 5   | 3 4 5 6 | ... | 3 4   | 0   0   ]

Each response's positions restart at the prompt's length, as in its own row; a token
attends to the tokens before it in the prompt and in its own response (the reward
model's shared-prefix pairs, rlhf.data.batching.collate_pairs_shared_prefix, with G
branches), so every real token's output is the one of the separate rows, up to float
rounding. Every token also sees itself: a padding position with nothing else to see
would otherwise be all masked (NaN in SDPA, which would reach real tokens through
their zero attention weights). The output predicting a response's token sits at the
column of the token before it: its response's previous token, or for the first the
prompt's last token, shared by the G branches.

Packing matters most where responses differ in length: a batch pads every response to
its longest (here never), so a group's row is P + sum of the G lengths, not P + G R.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.config import ModelConfig
from rlhf.lm_head import chunked_head, chunked_logprobs
from rlhf.losses import entropy_from_logits, logprobs_from_logits
from rlhf.models import custom_attention_mask, position_ids_from_mask


@dataclass
class GroupLayout:
    """One row per group of `group` responses (B = rows x group responses, R columns each
    in the rollout batch); T is the longest packed row."""

    input_ids: torch.Tensor  # (B / G, T)
    allowed: torch.Tensor  # (B / G, 1, T, T) bool: True where a query (row) may attend to a key (column)
    position_ids: torch.Tensor  # (B / G, T)
    predictor_rows: torch.Tensor  # (B, R) the row (group) ...
    predictor_cols: torch.Tensor  # (B, R) ... and column whose output predicts each response token
    response_ids: torch.Tensor  # (B, R)
    action_mask: torch.Tensor  # (B, R)

    @property
    def first_predictor(self) -> int:
        """The leftmost column any response token is predicted from (the output layer
        runs from there on)."""
        return int(self.predictor_cols.min())

    def flat_predictors(self, width: int, first: int = 0) -> torch.Tensor:
        """`(B, R)` indices into the model's outputs flattened over (row, column), of
        which it kept the last `width` columns starting at column `first`."""
        return self.predictor_rows * width + self.predictor_cols - first


def group_layout(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                 action_mask: torch.Tensor, group: int) -> GroupLayout:
    """Rows `k G .. k G + G - 1` (one prompt, padded on any side, `(B, P)`; responses
    `(B, R)`, their action tokens the real ones) as one packed row each (see the module
    docstring). The prompt of a group is read from its first row."""
    B, P = prompt_ids.shape
    R, rows, dev = response_ids.shape[1], B // group, prompt_ids.device
    if rows * group != B:
        raise ValueError(f"{B} rows are not whole groups of {group}")
    pmask, amask = prompt_mask[::group].bool(), action_mask.bool()
    # Every item of a group, in order: its prompt's P columns, then its G responses' R each.
    ids = torch.cat([prompt_ids[::group], response_ids.reshape(rows, group * R)], 1)
    real = torch.cat([pmask, amask.reshape(rows, group * R)], 1)
    branch = torch.cat([torch.zeros(P, dtype=torch.long, device=dev),
                        torch.arange(1, group + 1, device=dev).repeat_interleave(R)]).expand(rows, -1)
    plen = pmask.sum(1)  # (rows,)
    rank = position_ids_from_mask(amask)  # (B, R) a token's index among its response's real ones
    positions = torch.cat([position_ids_from_mask(pmask),
                           (plen[:, None, None] + rank.reshape(rows, group, R)).reshape(rows, group * R)], 1)
    # Packed: each real item moves to the column after the real items before it.
    dest = real.long().cumsum(1) - 1
    width = real.sum(1, keepdim=True)  # (rows, 1) each packed row's real tokens
    T = int(width.max())
    row_of = torch.arange(rows, device=dev)[:, None].expand_as(dest)
    at = (row_of[real], dest[real])

    def packed(values: torch.Tensor, fill: int) -> torch.Tensor:
        out = torch.full((rows, T), fill, dtype=values.dtype, device=dev)
        out[at] = values[real]
        return out

    input_ids = packed(ids, 0)
    pbranch, ppos = packed(branch, -1), packed(positions, 0)
    preal = torch.arange(T, device=dev)[None] < width
    col = torch.arange(T, device=dev)
    sees = (col[:, None] >= col[None, :]) & ((pbranch[:, :, None] == pbranch[:, None, :]) | (pbranch[:, None, :] == 0))
    allowed = (sees & preal[:, None, :]) | torch.eye(T, dtype=torch.bool, device=dev)[None]
    # A response token is predicted by the packed column before it; its first, by the prompt's last.
    rdest = dest[:, P:].reshape(B, R)
    cols = torch.where(rank == 0, plen.repeat_interleave(group)[:, None] - 1, rdest - 1)
    cols = torch.where(amask, cols, cols[amask].min() if amask.any() else 0)  # any kept column off the mask
    prow = torch.arange(rows, device=dev).repeat_interleave(group)[:, None].expand(B, R)
    return GroupLayout(input_ids, allowed[:, None], ppos, prow.contiguous(), cols, response_ids, action_mask)


def group_logprobs(model, layout: GroupLayout, temperature: float = 1.0, with_entropy: bool = False,
                   entropy_grad: bool = False, chunk_mib: float = ModelConfig.logits_chunk_mib):
    """`rlhf.rollout.response_logprobs` of the responses in the group layout: log-probs
    `(B, R)` (and entropy `(B, R)` with `with_entropy`), 0 off the action mask; only the
    action tokens go through the LM head, in chunks (rlhf.lm_head)."""
    B, R = layout.response_ids.shape
    first = layout.first_predictor
    keep = layout.input_ids.shape[1] - first
    kwargs = dict(input_ids=layout.input_ids, attention_mask=custom_attention_mask(model, layout.allowed),
                  position_ids=layout.position_ids, use_cache=False, logits_to_keep=keep)
    index = layout.flat_predictors(keep, first)
    select = layout.action_mask.bool()
    if not chunked_head(model, chunk_mib):
        logits = model(**kwargs).logits
        logits = logits.reshape(-1, logits.shape[-1])[index].float()
        if temperature != 1.0:
            logits = logits / temperature
        logprobs = logprobs_from_logits(logits, layout.response_ids) * select
        if not with_entropy:
            return logprobs
        with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
            return logprobs, entropy_from_logits(logits) * select
    lp, ent = chunked_logprobs(model, kwargs,
                               lambda hidden: (hidden.reshape(-1, hidden.shape[-1])[index[select]],
                                               layout.response_ids[select]),
                               temperature, with_entropy, entropy_grad, chunk_mib)
    logprobs = lp.new_zeros(select.shape).masked_scatter(select, lp)
    if not with_entropy:
        return logprobs
    return logprobs, ent.new_zeros(select.shape).masked_scatter(select, ent)


def group_values(model, layout: GroupLayout) -> torch.Tensor:
    """`rlhf.rollout.response_values` in the group layout: `(B, R)`, column t the value of
    the state before response token t (a ScalarModel or its engine)."""
    values = model(layout.input_ids, layout.allowed, layout.position_ids)
    return values.reshape(-1)[layout.flat_predictors(values.shape[1])]
