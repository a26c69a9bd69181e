"""Rollout engines: what the on-policy trainer samples responses through.

An engine owns sampling and its exactness (settings, stop ids, pad never drawn, the
ZeRO-3 gather-once); trainers never decode (or call vLLM) themselves. A new
engine implements `generate` and `sync_weights`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.config import RolloutConfig
from rlhf.data.batching import collate_prompts
from rlhf.rollout.hf import generate


@dataclass
class Rollout:
    """`n` responses to each of a batch of prompts; rows of one prompt consecutive
    (rows `k*n .. k*n+n-1` answer prompt k). Shapes: B rows, P prompt columns, R response
    columns (layout in rlhf.rollout.hf)."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R) pad after the first stop token
    action_mask: torch.Tensor  # (B, R) 1 up to and including the first stop token
    logprobs: torch.Tensor | None  # (B, R) the sampler's log-probs, when asked for
    rows: list[dict]  # (B) the prompt rows: `prompt` text, `fields`, `where`


class RolloutEngine:
    """Samples responses from the current policy."""

    def generate(self, prompts: list[dict], n: int = 1, greedy: bool = False) -> Rollout:
        """`n` responses to each prompt row (`prompt_ids`, `prompt`, ...)."""
        raise NotImplementedError

    def sync_weights(self, policy) -> None:
        """Make the engine sample from the policy's current weights (after an update)."""
        raise NotImplementedError


class HFEngine(RolloutEngine):
    """Decoding with the policy's own DeepSpeed engine (rlhf.rollout.hf.generate: its HF
    forward and key/value cache, rows leaving the batch as they stop): under ZeRO-3 the
    weights are gathered once per rollout batch; with n > 1 each prompt's prefill runs
    once for its n rows (exact up to rounding, so not a setting).
    It samples from the live weights, so `sync_weights` has nothing to do."""

    def __init__(self, policy, cfg: RolloutConfig, tokenizer, zero_stage: int, stop_ids: list[int]):
        self.policy, self.cfg, self.tokenizer = policy, cfg, tokenizer
        self.zero_stage, self.stop_ids = zero_stage, stop_ids

    def generate(self, prompts: list[dict], n: int = 1, greedy: bool = False) -> Rollout:
        dev = self.policy.device
        batch = collate_prompts(prompts, self.tokenizer.pad_token_id)
        prompt_ids, prompt_mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        if n > 1:
            prompt_ids, prompt_mask = prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0)
            prompts = [p for p in prompts for _ in range(n)]
        response, action_mask, logprobs = generate(self.policy, prompt_ids, prompt_mask, self.cfg, self.tokenizer,
                                                   self.zero_stage, greedy=greedy,
                                                   with_logprobs=self.cfg.logprobs_from_generation,
                                                   stop_ids=self.stop_ids, group=n)
        return Rollout(prompt_ids, prompt_mask, response, action_mask, logprobs, prompts)

    def sync_weights(self, policy) -> None:
        pass
