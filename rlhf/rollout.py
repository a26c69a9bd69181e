"""Generation and the forward passes that turn it into PPO experience.

Token layout of one rollout batch (B rows):

    input_ids      [ pad pad p p p | r r r EOS pad pad ]
                     prompt (P cols, left-padded) | response (R cols)
    attention_mask [  0   0  1 1 1 | 1 1 1  1   0   0  ]
    action_mask                    [ 1 1 1  1   0   0  ]   (R cols)

The action mask covers the response up to and including the first EOS, found from
positions; padding after it is masked out. Pad and EOS are different tokens (the
tokenizer loader guarantees it), and the pad token is never sampled.
Every per-token tensor of PPO (`logprobs`, `values`, `rewards`, `advantages`, ...)
has the response's R columns: column t is about response token t, and the model
output that predicts it sits at position P + t - 1.
"""

from __future__ import annotations

import contextlib

import torch

from rlhf.config import RolloutConfig
from rlhf.losses import entropy_from_logits, logprobs_from_logits
from rlhf.models import position_ids_from_mask


def action_mask_from_response(response_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 on response tokens up to and including the first EOS, 0 after; `(B, R)` long.

    A row without EOS (it reached max_new_tokens) is all ones.
    """
    R = response_ids.shape[1]
    positions = torch.arange(R, device=response_ids.device).expand_as(response_ids)
    is_eos = response_ids == eos_id
    first_eos = torch.where(is_eos, positions, torch.full_like(positions, R)).min(dim=1).values
    return (positions <= first_eos[:, None]).long()


def generation_context(engine, zero_stage: int):
    """Decode on torch's own `linear` (see `torch_linear`) and, under ZeRO-3, gather the
    policy's parameters once for a whole rollout batch and lift the per-module fetch
    hooks while generating, instead of gathering every layer for every generated token
    (the slowness DeepSpeed-Chat users reported, DeepSpeedExamples #718). Costs one
    full copy of the weights per rank meanwhile."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch_linear())
    if zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        stack.enter_context(unwrap_model_for_generation(engine))
    return stack


@contextlib.contextmanager
def torch_linear():
    """Use torch's own `linear` for the duration; for passes without backward.

    Once any model is built under ZeRO-3 (`deepspeed.zero.Init`), DeepSpeed replaces
    torch.nn.functional.linear process-wide with an autograd Function that can
    re-gather a weight in backward, and every model in the process pays for it, ZeRO-0
    ones included. Passes without backward (generation, scoring) do not need it; it
    costs about a tenth to a third of a small model's decoding time (measured with
    benchmarks/bench_rollout.py), so they run on the original. A no-op when nothing
    was replaced.
    """
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    original = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    current = torch.nn.functional.linear
    if original is None or current is original:
        yield
        return
    torch.nn.functional.linear = original
    try:
        yield
    finally:
        torch.nn.functional.linear = current


@torch.no_grad()
def generate(engine, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cfg: RolloutConfig, tokenizer,
             zero_stage: int, greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one response per prompt.

    Args:
        engine: the policy's DeepSpeed engine.
        prompt_ids, prompt_mask: `(B, P)`, left-padded.
        cfg: sampling settings.
        greedy: take the most likely token instead of sampling (for tests and comparisons).

    Returns:
        response_ids `(B, R)` (pad after the first EOS) and action_mask `(B, R)`, with
        R <= cfg.max_new_tokens (generation stops when every row has ended).
    """
    was_training = engine.module.training
    engine.module.eval()
    chunk = cfg.micro_batch_size or prompt_ids.shape[0]
    outs = []
    with generation_context(engine, zero_stage):
        model = engine.module
        for i in range(0, prompt_ids.shape[0], chunk):
            ids, mask = prompt_ids[i:i + chunk], prompt_mask[i:i + chunk]
            seq = model.generate(
                input_ids=ids, attention_mask=mask,
                do_sample=not greedy,
                temperature=cfg.temperature if not greedy else None,
                top_k=cfg.top_k if not greedy else None,
                top_p=cfg.top_p if not greedy else None,
                max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                suppress_tokens=[tokenizer.pad_token_id],  # pad is not a word: never sample it
                use_cache=True,
            )
            outs.append(seq[:, ids.shape[1]:])
    if was_training:
        engine.module.train()
    width = max(o.shape[1] for o in outs)
    response = torch.full((prompt_ids.shape[0], width), tokenizer.pad_token_id, dtype=torch.long,
                          device=prompt_ids.device)
    row = 0
    for o in outs:
        response[row:row + o.shape[0], :o.shape[1]] = o
        row += o.shape[0]
    return end_at_eos(response, tokenizer.eos_token_id, tokenizer.pad_token_id)


def end_at_eos(response_ids: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated `(B, R)` ids -> (ids with pad after the first EOS, action mask): whatever
    generate put after the first EOS becomes pad, so the tensors say what the masks say."""
    action_mask = action_mask_from_response(response_ids, eos_id)
    response_ids = torch.where(action_mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    return response_ids, action_mask


def full_sequence(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                  action_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt and response side by side: input_ids and attention_mask `(B, P + R)`."""
    return torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, action_mask.to(prompt_mask.dtype)], 1)


def response_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                      temperature: float = 1.0, with_entropy: bool = False, entropy_grad: bool = False):
    """Log-probabilities `(B, R)` of the response tokens under a causal LM (and their
    entropy `(B, R)` when asked; without `entropy_grad` it is computed outside the
    autograd graph, for logging only). Logits are divided by the sampling temperature
    so that they describe the distribution the tokens were drawn from."""
    # Only the positions that predict response tokens go through the LM head.
    response_width = input_ids.shape[1] - prompt_width
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                logits_to_keep=response_width + 1)
    logits = out.logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = logprobs_from_logits(logits, input_ids[:, prompt_width:])
    if with_entropy:
        if entropy_grad:
            return logprobs, entropy_from_logits(logits)
        with torch.no_grad():
            return logprobs, entropy_from_logits(logits)
    return logprobs


def response_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """Values `(B, R)`: column t is the value of the state before response token t."""
    return model(input_ids, attention_mask)[:, prompt_width - 1:-1]
