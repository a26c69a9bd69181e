"""Compare two policies on a prompt set, in one process with plain transformers.

`compare_policies` samples one response per prompt from each policy (same seed,
same sampling settings), scores both with a reward model, and reports mean scores,
the win rate of the policy over the baseline, and the policy's KL to the baseline.
With the built-in task it also reports the gold reward and the win rate by gold
reward. This is what `rlhf eval` runs and what the pipeline's report is made of.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rlhf.data.batching import cat_padded, collate_prompts, pad
from rlhf.losses import masked_sum
from rlhf.models import ScalarModel, sequence_scores
from rlhf.rollout import end_at_eos, full_sequence, is_stop, response_logprobs, sample_responses


@dataclass
class Sampling:
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    batch_size: int = 64
    seed: int = 0


def load_policy(path: str | Path, device: str = "cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, tok


def load_reward_model(path: str | Path, device: str = "cpu"):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).to(device).eval()


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], s: Sampling, stop_ids: list[int] | None = None,
           prompt_ids: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt ids/mask `(N, P)` (left-padded) and response ids/action mask `(N, R)` for every prompt.

    `prompt_ids` are the prompts' token ids as the trainer made them (a rendered chat
    prompt is tokenized without adding special tokens again); None encodes the texts.
    `stop_ids`: the tokens that end a response (None: the tokenizer's EOS)."""
    from rlhf.tokens import encode_prompt

    stop_ids = stop_ids or [tokenizer.eos_token_id]
    if prompt_ids is None:
        prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    batches = []
    gen = torch.Generator().manual_seed(s.seed)
    for i in range(0, len(prompts), s.batch_size):
        b = collate_prompts([{"prompt_ids": ids} for ids in prompt_ids[i:i + s.batch_size]],
                            tokenizer.pad_token_id)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        out, _ = sample_responses(model, b["input_ids"].to(model.device), b["attention_mask"].to(model.device), s,
                                  stop_ids, tokenizer.pad_token_id, greedy=s.temperature == 0)
        batches.append((b["input_ids"], b["attention_mask"], out.cpu()))
    pad_id = tokenizer.pad_token_id
    ids = cat_padded([x[0] for x in batches], pad_id, "left")
    mask = cat_padded([x[1] for x in batches], 0, "left")
    resp = cat_padded([x[2] for x in batches], pad_id)
    resp, action = end_at_eos(resp, stop_ids, pad_id)
    return ids, mask, resp, action


@torch.no_grad()
def score(reward_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Reward-model scores `(N,)`, read at each sequence's last real token (from positions)."""
    scalar = ScalarModel(reward_model)
    out = [sequence_scores(scalar, input_ids[i:i + batch_size].to(reward_model.device),
                           attention_mask[i:i + batch_size].to(reward_model.device)).cpu()
           for i in range(0, input_ids.shape[0], batch_size)]
    return torch.cat(out)


class RewardScorer:
    """Score texts or token ids with a trained reward model (any directory that loads as
    `AutoModelForSequenceClassification` with one label), batched.

        scorer = RewardScorer("runs/quickstart/rm/final")
        scorer.score(["Describe the apple and the river.\nlovely and calm."])  # texts
        scorer.score_ids([[12, 7, 99, 0]])                                 # token ids

    Each sequence is scored at its own last token, found from positions, so the result
    does not depend on padding side or on the other sequences of the batch. Texts are
    tokenized as the trainer does (special tokens of the tokenizer, then EOS appended
    unless `add_eos=False`), which is how the reward model saw its training pairs.
    """

    def __init__(self, path: str | Path, device: str = "cpu", batch_size: int = 64):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = load_reward_model(path, device)
        self.batch_size = batch_size

    def score(self, texts: list[str], add_eos: bool = True) -> list[float]:
        from rlhf.tokens import encode_prompt

        ids = [encode_prompt(self.tokenizer, t) + ([self.tokenizer.eos_token_id] if add_eos else []) for t in texts]
        return self.score_ids(ids)

    def score_ids(self, ids: list[list[int]]) -> list[float]:
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = pad(ids, pad_id)
        mask = pad([[1] * len(x) for x in ids], 0)
        return score(self.model, input_ids, mask, self.batch_size).tolist()


@torch.no_grad()
def sequence_kl(model, ref, input_ids, attention_mask, action_mask, prompt_width: int, temperature: float,
                batch_size: int = 64) -> torch.Tensor:
    """Per-response KL estimate (k1, summed over tokens) of `model` to `ref` on `model`'s samples."""
    out = []
    for i in range(0, input_ids.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        ids, mask = input_ids[sl].to(model.device), attention_mask[sl].to(model.device)
        lp = response_logprobs(model, ids, mask, prompt_width, temperature)
        lr = response_logprobs(ref, ids, mask, prompt_width, temperature)
        out.append(masked_sum(lp - lr, action_mask[sl].to(lp.device).float(), dim=1).cpu())
    return torch.cat(out)


def compare_policies(policy_dir: str | Path, baseline_dir: str | Path, reward_dir: str | Path | None,
                     prompts: list[str], sampling: Sampling, gold: Callable[[str, str], float] | None = None,
                     device: str = "cpu", prompt_ids: list[list[int]] | None = None) -> dict:
    """Mean scores of both policies, the policy's win rate over the baseline, its KL to it.

    Both policies sample until any of the policy's stop tokens (its tokenizer's EOS, its
    chat template's end of turn, its generation_config's EOS ids); `prompt_ids`, when
    given, are the prompts as the trainer tokenized them.

    Returns a dict with `kl`, `response_length_policy`, `eos_rate_policy`, with a reward
    model (`reward_dir`; None for none, as after DPO) `score_policy`, `score_baseline`,
    `win_rate_score`, and, when `gold` is given, `gold_policy`, `gold_baseline`, `win_rate`
    (by gold reward), plus `samples` (a few examples).
    """
    from rlhf.task import win_rate
    from rlhf.tokens import stop_token_ids

    policy, tok = load_policy(policy_dir, device)
    stops = stop_token_ids(tok, policy_dir)
    baseline, _ = load_policy(baseline_dir, device)
    rm = load_reward_model(reward_dir, device) if reward_dir is not None else None
    results: dict = {"prompts": len(prompts)}
    per: dict[str, dict] = {}
    for name, model in (("policy", policy), ("baseline", baseline)):
        ids, mask, resp, action = sample(model, tok, prompts, sampling, stops, prompt_ids)
        seq, seq_mask = full_sequence(ids, mask, resp, action)
        texts = [tok.decode(r[a.bool()].tolist(), skip_special_tokens=True) for r, a in zip(resp, action)]
        per[name] = {"scores": score(rm, seq, seq_mask).tolist() if rm is not None else None, "texts": texts,
                     "length": action.sum(1).float().mean().item(),
                     "eos": (is_stop(resp, stops) & action.bool()).any(1).float().mean().item()}
        if name == "policy":
            results["kl"] = sequence_kl(policy, baseline, seq, seq_mask, action, ids.shape[1],
                                        sampling.temperature).mean().item()
        if gold is not None:
            per[name]["gold"] = [gold(p, t) for p, t in zip(prompts, texts)]
    if rm is not None:
        results["score_policy"] = sum(per["policy"]["scores"]) / len(prompts)
        results["score_baseline"] = sum(per["baseline"]["scores"]) / len(prompts)
        results["win_rate_score"] = win_rate(per["policy"]["scores"], per["baseline"]["scores"])
    results["response_length_policy"] = per["policy"]["length"]
    results["eos_rate_policy"] = per["policy"]["eos"]
    if gold is not None:
        results["gold_policy"] = sum(per["policy"]["gold"]) / len(prompts)
        results["gold_baseline"] = sum(per["baseline"]["gold"]) / len(prompts)
        results["win_rate"] = win_rate(per["policy"]["gold"], per["baseline"]["gold"])
    pick = random.Random(sampling.seed).sample(range(len(prompts)), min(4, len(prompts)))
    results["samples"] = [{"prompt": prompts[i], "policy": per["policy"]["texts"][i],
                           "baseline": per["baseline"]["texts"][i]} for i in pick]
    return results
