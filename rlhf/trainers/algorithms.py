"""Critic-free on-policy algorithms: GRPO, RLOO (and Dr. GRPO, DAPO's options) and REINFORCE++.

Each is a small `Algorithm` for the shared loop (rlhf/trainers/onpolicy.py): how
scores become rewards, rewards become advantages, and what the policy's loss is, from
the pure functions of rlhf/losses.py. No value model is trained. A new algorithm is one
such class, a config (rlhf/config/stages.py) and a line in the registry (rlhf/stages.py).
"""

from __future__ import annotations

import torch

from rlhf.losses import (aggregate_loss, clipped_policy_loss, compute_rewards, group_advantages, groups_all_equal,
                         kl_penalty, masked_sum, overlong_penalty, reinforce_returns)
from rlhf.trainers.onpolicy import Algorithm, Experience, OnPolicyTrainer


class PolicyGradient(Algorithm):
    """The clipped policy loss the critic-free methods share, with the loss aggregation,
    asymmetric clipping, an optional k3 KL term and an entropy bonus."""

    kl_in_loss = False

    def penalised_scores(self, exp: Experience) -> torch.Tensor:
        """Scores `(B,)` with the missing-EOS and overlong penalties taken off."""
        hp, scores = self.hp, exp.scores.float()
        if hp.missing_eos_penalty is not None:
            scores = scores - hp.missing_eos_penalty * (~self.trainer.has_eos(exp)).float()
        if hp.overlong_buffer:
            lengths = exp.action_mask.sum(1)
            scores = scores + overlong_penalty(lengths, self.cfg.rollout.max_new_tokens, hp.overlong_buffer,
                                               hp.overlong_factor)
        return scores

    def loss_counts(self, mb: Experience) -> dict[str, torch.Tensor]:
        mask = mb.loss_mask if mb.loss_mask is not None else mb.action_mask
        return {"tokens": mask.sum().float(), "responses": (mask.sum(1) > 0).sum().float()}

    def policy_loss(self, mb, logprobs, entropy, counts, scale):
        hp = self.hp
        mask = (mb.loss_mask if mb.loss_mask is not None else mb.action_mask).float()
        # The minibatch's count of what the aggregation averages over, on all ranks; the
        # scale undoes DeepSpeed's division by accumulation steps x ranks.
        count = max(counts["tokens" if hp.loss_aggregation == "token_mean" else "responses"], 1.0)
        normalizer = count / scale
        L = self.cfg.rollout.max_new_tokens
        loss, st = clipped_policy_loss(logprobs, mb.logprobs, mb.advantages, mask, hp.clip_low, hp.clip_high,
                                       hp.loss_aggregation, normalizer, L)
        # Metric sums are divided by the minibatch's tokens after the sum over ranks.
        to_metric = normalizer * counts["tokens"] / count
        n = mask.sum().item()
        stats = {"policy_loss": loss.item() * to_metric, "clipfrac": st["clipfrac"].item() * n,
                 "approx_kl": st["approx_kl"].item() * n, "ratio": st["ratio"].item() * n}
        if self.kl_in_loss and hp.kl_coef > 0:
            kl = aggregate_loss(kl_penalty(logprobs, mb.ref_logprobs, "k3"), mask, hp.loss_aggregation, normalizer, L)
            loss = loss + hp.kl_coef * kl
            stats["kl_loss"] = kl.item() * to_metric
        if hp.entropy_coef:
            loss = loss - hp.entropy_coef * aggregate_loss(entropy, mask, hp.loss_aggregation, normalizer, L)
        if entropy is not None:
            stats.update(entropy=masked_sum(entropy, mask).item(), entropy_tokens=n)
        return loss, stats


class GroupPolicyGradient(PolicyGradient):
    """GRPO, Dr. GRPO and RLOO: each response's advantage compares its score with the
    other responses to its prompt (`rollout.n` consecutive rows); the same value on
    every token of the response."""

    @property
    def kl_in_loss(self) -> bool:
        return self.hp.kl_in == "loss"

    @property
    def rewards_use_logprobs(self) -> bool:
        return self.hp.kl_in == "reward" and self.uses_reference

    def compute_rewards(self, exp: Experience) -> torch.Tensor:
        """One reward per response `(B,)`: the penalised score, less kl_coef x its
        summed k1 KL when the KL goes in the reward."""
        rewards = self.penalised_scores(exp)
        if self.hp.kl_in == "reward" and exp.ref_logprobs is not None:
            k1 = masked_sum(kl_penalty(exp.logprobs, exp.ref_logprobs, "k1"), exp.action_mask.float(), dim=1)
            rewards = rewards - self.hp.kl_coef * k1
        return rewards

    def compute_advantages(self, exp: Experience) -> tuple[torch.Tensor, None]:
        n, mask = self.cfg.rollout.n, exp.action_mask.float()
        advantages = group_advantages(exp.rewards, n, self.hp.advantage)
        if self.hp.dynamic_sampling:
            # Masked out of the loss rather than dropped, so every rank keeps the same
            # minibatches and collective calls.
            keep = ~groups_all_equal(exp.scores, n)
            exp.loss_mask = exp.action_mask * keep[:, None].to(exp.action_mask.dtype)
        return advantages[:, None] * mask, None

    def metrics(self, exp: Experience) -> dict[str, torch.Tensor]:
        if not self.hp.dynamic_sampling:
            return {}
        return {"filtered": groups_all_equal(exp.scores, self.cfg.rollout.n).float().sum()}


class ReinforcePlusPlus(PolicyGradient):
    """REINFORCE++ (Hu 2025): PPO's per-token rewards (the KL penalty on every action
    token, the score on the last), returns as their reverse sum (gamma 1), advantages
    the returns whitened over all action tokens of all ranks."""

    def compute_rewards(self, exp: Experience) -> torch.Tensor:
        hp = self.hp
        ref = exp.ref_logprobs if exp.ref_logprobs is not None else exp.logprobs  # kl_coef 0: no reference
        return compute_rewards(self.penalised_scores(exp), exp.logprobs, ref, exp.action_mask.float(), hp.kl_coef,
                               hp.clip_score, hp.kl_estimator)

    def compute_advantages(self, exp: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        mask = exp.action_mask.float()
        returns = reinforce_returns(exp.rewards, mask)
        mean, var = self.trainer.global_mean_var(returns, mask)
        return (returns - mean) * torch.rsqrt(var + 1e-8) * mask, returns


class GRPOTrainer(OnPolicyTrainer):
    stage = "grpo"
    algorithm_class = GroupPolicyGradient


class RLOOTrainer(OnPolicyTrainer):
    stage = "rloo"
    algorithm_class = GroupPolicyGradient


class ReinforceTrainer(OnPolicyTrainer):
    stage = "reinforce"
    algorithm_class = ReinforcePlusPlus
