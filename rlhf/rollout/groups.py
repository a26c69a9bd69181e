"""The shared-prefix layout of a group: a prompt's G responses scored after one copy of it.

A rollout batch with rollout.n = G holds G consecutive rows per prompt, each the prompt
then a response (rlhf.rollout.hf). Laid out as one row per group, the prompt's P
columns go through the model once instead of G times:

    input_ids     [ pad p p p | r r EOS pad | r r r r | ... | r EOS pad pad ]
                    prompt (P)  response 1   response 2       response G  (R columns each)
    position_ids  [ 0   0 1 2 | 3 4 5   6   | 3 4 5 6 | ... | 3 4   5   6   ]

Each response's positions restart at the prompt's length, as in its own row; a token
attends to the real tokens before it in the prompt and in its own response (the reward
model's shared-prefix pairs, rlhf.data.batching.collate_pairs_shared_prefix, with G
branches), so every real token's output is the one of the separate rows, up to float
rounding. Every token also sees itself: a padding position with nothing else to see
would otherwise be all masked (NaN in SDPA, which would reach real tokens through
their zero attention weights). The output predicting response token t of branch g
sits at column P + g R + t - 1 for t >= 1 and, for t = 0, at the prompt's last column
P - 1 (prompts are left-padded), shared by the G branches.
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
    """One row per group of `group` responses (B = rows x group responses of R tokens)."""

    input_ids: torch.Tensor  # (B / G, P + G R)
    allowed: torch.Tensor  # (B / G, 1, T, T) bool: True where a query (row) may attend to a key (column)
    position_ids: torch.Tensor  # (B / G, T)
    predictors: torch.Tensor  # (G R,) the column whose output predicts each response token
    response_ids: torch.Tensor  # (B, R)
    action_mask: torch.Tensor  # (B, R)


def group_layout(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                 action_mask: torch.Tensor, group: int) -> GroupLayout:
    """Rows `k G .. k G + G - 1` (one prompt, left-padded, `(B, P)`; responses `(B, R)`)
    as one row each (see the module docstring). The prompt of a group is read from its
    first row."""
    B, P = prompt_ids.shape
    R, rows, dev = response_ids.shape[1], B // group, prompt_ids.device
    if rows * group != B:
        raise ValueError(f"{B} rows are not whole groups of {group}")
    prompts, pmask = prompt_ids[::group], prompt_mask[::group]
    ids = torch.cat([prompts, response_ids.reshape(rows, group * R)], 1)
    real = torch.cat([pmask, action_mask.reshape(rows, group * R).to(pmask.dtype)], 1).bool()
    positions = torch.cat([position_ids_from_mask(pmask),
                           pmask.long().sum(1, keepdim=True) + torch.arange(R, device=dev).repeat(group)], 1)
    branch = torch.cat([torch.zeros(P, dtype=torch.long, device=dev),
                        torch.arange(1, group + 1, device=dev).repeat_interleave(R)])
    col = torch.arange(P + group * R, device=dev)
    sees = (col[:, None] >= col[None, :]) & ((branch[:, None] == branch[None, :]) | (branch[None, :] == 0))
    allowed = (sees[None] & real[:, None, :]) | torch.eye(len(col), dtype=torch.bool, device=dev)[None]
    starts = P + R * torch.arange(group, device=dev)[:, None]
    predictors = torch.cat([torch.full((group, 1), P - 1, device=dev), starts + torch.arange(R - 1, device=dev)], 1)
    return GroupLayout(ids, allowed[:, None], positions, predictors.reshape(-1), response_ids, action_mask)


def group_logprobs(model, layout: GroupLayout, temperature: float = 1.0, with_entropy: bool = False,
                   entropy_grad: bool = False, chunk_mib: float = ModelConfig.logits_chunk_mib):
    """`rlhf.rollout.response_logprobs` of the responses in the group layout: log-probs
    `(B, R)` (and entropy `(B, R)` with `with_entropy`), 0 off the action mask; only the
    action tokens go through the LM head, in chunks (rlhf.lm_head)."""
    B, R = layout.response_ids.shape
    first = int(layout.predictors.min())
    kwargs = dict(input_ids=layout.input_ids, attention_mask=custom_attention_mask(model, layout.allowed),
                  position_ids=layout.position_ids, use_cache=False, logits_to_keep=layout.input_ids.shape[1] - first)
    cols = layout.predictors - first
    select = layout.action_mask.bool()
    if not chunked_head(model, chunk_mib):
        logits = model(**kwargs).logits[:, cols].float().reshape(B, R, -1)
        if temperature != 1.0:
            logits = logits / temperature
        logprobs = logprobs_from_logits(logits, layout.response_ids) * select
        if not with_entropy:
            return logprobs
        with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
            return logprobs, entropy_from_logits(logits) * select
    lp, ent = chunked_logprobs(model, kwargs,
                               lambda hidden: (hidden[:, cols].reshape(B, R, -1)[select], layout.response_ids[select]),
                               temperature, with_entropy, entropy_grad, chunk_mib)
    logprobs = lp.new_zeros(select.shape).masked_scatter(select, lp)
    if not with_entropy:
        return logprobs
    return logprobs, ent.new_zeros(select.shape).masked_scatter(select, ent)


def group_values(model, layout: GroupLayout) -> torch.Tensor:
    """`rlhf.rollout.response_values` in the group layout: `(B, R)`, column t the value of
    the state before response token t (a ScalarModel or its engine)."""
    B, R = layout.response_ids.shape
    values = model(layout.input_ids, layout.allowed, layout.position_ids)
    return values[:, layout.predictors].reshape(B, R)
