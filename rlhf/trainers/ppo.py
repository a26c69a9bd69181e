"""Stage 3: PPO against the frozen reward model (Ouyang et al. 2022; Ziegler et al. 2019).

PPO is one algorithm of the on-policy loop (rlhf/trainers/onpolicy.py); its own steps:

    compute_rewards     - per-token reward: -kl_coef * KL to the reference on every
                          response token, plus the score on the last one
    compute_advantages  - GAE over the response tokens, with the value model's values; whitened
    losses              - the clipped policy loss and the clipped value loss, each model
                          its own optimizer
    after_step          - the KL controller moves kl_coef toward its target (when adaptive)

`PPOTrainer` adds InstructGPT's ptx loss and an EMA of the policy. Each named step of
the trainer (`make_experience`, `compute_rewards`, `compute_advantages`, `learn`,
`train_step`) can be overridden alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rlhf.config import PPOConfig
from rlhf.data import build_stage_data
from rlhf.data.batching import StepSampler, collate_sft
from rlhf.losses import gae, lm_loss, make_kl_controller, masked_sum, policy_loss, value_loss
from rlhf.losses import compute_rewards as reward_with_kl
from rlhf.models import save_pretrained
from rlhf.trainers.onpolicy import Algorithm, Experience, OnPolicyTrainer

__all__ = ["PPO", "PPOTrainer", "Experience"]


class PPO(Algorithm):
    """PPO with a critic: per-token rewards, GAE, clipped policy and value losses."""

    critic = True

    def __init__(self, cfg: PPOConfig, trainer: OnPolicyTrainer):
        super().__init__(cfg, trainer)
        ppo = self.hp
        self.kl_ctl = make_kl_controller(ppo.kl_controller, ppo.kl_coef, ppo.kl_target, ppo.kl_horizon)

    @property
    def uses_reference(self) -> bool:
        return True

    @property
    def kl_coef(self) -> float:
        return self.kl_ctl.value

    def compute_rewards(self, exp: Experience) -> torch.Tensor:
        """Per-token rewards `(B, R)`: the KL penalty everywhere, the score at the end."""
        ppo = self.hp
        scores = exp.scores
        if ppo.missing_eos_penalty is not None:
            scores = scores - ppo.missing_eos_penalty * (~self.trainer.has_eos(exp)).float()
        if ppo.normalize_scores:
            mean, var = self.trainer.global_mean_var(scores, torch.ones_like(scores))
            scores = (scores - mean) / (var.sqrt() + 1e-8)
        return reward_with_kl(scores, exp.logprobs, exp.ref_logprobs, exp.action_mask.float(), self.kl_ctl.value,
                              ppo.clip_score, ppo.kl_estimator)

    def compute_advantages(self, exp: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        """GAE advantages and returns `(B, R)`; advantages whitened over all ranks' action tokens."""
        ppo = self.hp
        mask = exp.action_mask.float()
        advantages, returns = gae(exp.rewards, exp.values, mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            mean, var = self.trainer.global_mean_var(advantages, mask)
            advantages = (advantages - mean) * torch.rsqrt(var + 1e-8) * mask
        return advantages, returns

    def policy_loss(self, mb, logprobs, entropy, counts, scale):
        # Losses are sums over action tokens divided by the minibatch's action tokens on
        # all ranks (times accumulation x ranks, which DeepSpeed divides back out): a
        # token mean over the whole minibatch, whatever the micro-batch split.
        normalizer = max(counts["tokens"], 1.0) / scale
        mask = mb.action_mask.float()
        pg_loss, st = policy_loss(logprobs, mb.logprobs, mb.advantages, mask, self.hp.clip_range, normalizer)
        loss = pg_loss
        if self.hp.entropy_coef:
            loss = pg_loss - self.hp.entropy_coef * (masked_sum(entropy, mask) / normalizer)
        n = mask.sum().item()
        stats = {"policy_loss": pg_loss.item() * normalizer, "clipfrac": st["clipfrac"].item() * n,
                 "approx_kl": st["approx_kl"].item() * n, "ratio": st["ratio"].item() * n}
        if entropy is not None:
            stats.update(entropy=masked_sum(entropy, mask).item(), entropy_tokens=n)
        return loss, stats

    def value_loss(self, mb, values, counts, scale):
        normalizer = max(counts["tokens"], 1.0) / scale
        mask = mb.action_mask.float()
        v_loss, st = value_loss(values, mb.values, mb.returns, mask, self.hp.value_clip_range, normalizer)
        n = mask.sum().item()
        return v_loss, {"value_loss": v_loss.item() * normalizer, "value_clipfrac": st["clipfrac"].item() * n,
                        "value_error": st["value_error"].item() * n}

    def after_step(self, metrics: dict[str, float]) -> None:
        # adapt the KL coefficient to the KL just measured
        self.kl_ctl.update(metrics["ppo/kl"], self.cfg.rollout.batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"kl_controller": self.kl_ctl.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl_ctl.load_state_dict(state["kl_controller"])


class PPOTrainer(OnPolicyTrainer):
    stage = "ppo"
    algorithm_class = PPO
    plot_keys = ["ppo/value_error"]

    cfg: PPOConfig

    @property
    def kl_ctl(self):
        return self.algorithm.kl_ctl

    def build_extras(self) -> None:
        cfg, bb = self.cfg, self.backbone
        self.ema = [t.detach().clone() for t in self.ema_tensors()] if cfg.ppo.ema_decay else None
        self.ptx = None
        if cfg.ppo.ptx.coef > 0:
            ptx = bb.main_first(lambda: build_stage_data("sft", cfg.ppo.ptx.data, self.tokenizer))
            self.ptx = ptx.train
            self.ptx_sampler = StepSampler(len(self.ptx), cfg.train.global_batch_size, cfg.train.micro_batch_size,
                                           bb.world_size, bb.rank, cfg.seed)

    def after_step(self, metrics: dict[str, float]) -> None:
        super().after_step(metrics)
        self.update_ema()

    # ------------------------------------------------------------------ ptx

    def has_extra_policy_loss(self) -> bool:
        return self.ptx is not None

    def extra_policy_loss(self) -> torch.Tensor:
        return self.cfg.ppo.ptx.coef * self.ptx_loss()

    def ptx_loss(self) -> torch.Tensor:
        """Language-model loss on one micro-batch of the ptx data (InstructGPT's PPO-ptx)."""
        self._ptx_calls = getattr(self, "_ptx_calls", 0)
        per_step = self.accumulation  # micro-batches per optimizer step
        idx = self.ptx_sampler.step(self._ptx_calls // per_step)[self._ptx_calls % per_step]
        self._ptx_calls += 1
        batch = collate_sft([self.ptx[i] for i in idx], self.tokenizer.pad_token_id)
        dev = self.backbone.device
        out = self.policy(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                          position_ids=batch["position_ids"].to(dev), use_cache=False)
        return lm_loss(out.logits, batch["input_ids"].to(dev), batch["loss_mask"].to(dev))

    # ------------------------------------------------------------------ EMA, state, export

    def ema_tensors(self) -> list[torch.Tensor]:
        """The policy's parameter storage on this rank (its shard under ZeRO-3)."""
        return [p.ds_tensor if hasattr(p, "ds_tensor") else p.data for p in self.policy.module.parameters()]

    @torch.no_grad()
    def update_ema(self) -> None:
        if self.ema is None:
            return
        d = self.cfg.ppo.ema_decay
        for e, t in zip(self.ema, self.ema_tensors()):
            e.mul_(d).add_(t.to(e.dtype), alpha=1 - d)

    def state(self) -> dict[str, Any]:
        # The ptx position in optimizer steps: their micro-batch count depends on the ranks.
        return {**super().state(), "ptx_steps": getattr(self, "_ptx_calls", 0) // self.accumulation}

    def rank_state(self) -> dict[str, Any]:
        return {"ema": self.ema} if self.ema is not None else {}

    def load_state(self, state: dict[str, Any], rank_state: dict[str, Any]) -> None:
        super().load_state(state, rank_state)
        self._ptx_calls = state["ptx_steps"] * self.accumulation if "ptx_steps" in state else state.get("ptx_calls", 0)
        if self.ema is not None and "ema" in rank_state:
            self.ema = [t.to(e.device) for t, e in zip(rank_state["ema"], self.ema)]
        elif self.ema is not None:
            # Written by another number of ranks: the EMA shards do not map onto ours, so
            # the average restarts from the resumed weights.
            self.ema = [t.detach().clone() for t in self.ema_tensors()]
            self.backbone.print("[ppo] the EMA of the policy restarts from the resumed weights")

    def export(self, out_dir: Path) -> None:
        """final/ holds the policy; final/value/ the value model; final/ema/ the EMA policy."""
        super().export(out_dir)
        bb = self.backbone
        if self.ema is not None:
            live = [t.clone() for t in self.ema_tensors()]
            for t, e in zip(self.ema_tensors(), self.ema):
                t.copy_(e)
            ema_state = bb.full_state_dict(self.policy)
            for t, v in zip(self.ema_tensors(), live):
                t.copy_(v)
            if bb.is_main:
                save_pretrained(self.policy.module, ema_state, self.tokenizer, out_dir / "ema")
