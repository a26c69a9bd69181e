"""Stage 3: PPO against the frozen reward model (Ouyang et al. 2022; Ziegler et al. 2019).

One PPO step, as `train` reads:

    1. make_experience     - sample responses to a batch of prompts; score them (reward
                             model), and record the policy's and the reference's
                             log-probs and the value model's values
    2. compute_rewards     - per-token reward: -kl_coef * KL to the reference on every
                             response token, plus the score on the last one
    3. compute_advantages  - GAE over the response tokens; whitened
    4. train_step          - for each PPO epoch and minibatch: the clipped policy loss
                             and the clipped value loss, each model its own optimizer
    5. the KL controller moves kl_coef toward its target (when adaptive)

Each named step can be overridden alone. All per-token tensors have the response's
columns only (see rlhf.rollout for the token layout).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf.config import ModelConfig, PPOConfig, exact_div
from rlhf.data import build_stage_data
from rlhf.data.batching import StepSampler, collate_prompts, collate_sft
from rlhf.losses import gae, lm_loss, make_kl_controller, masked_sum, policy_loss, value_loss
from rlhf.losses import compute_rewards as reward_with_kl
from rlhf.models import (ScalarModel, apply_lora, load_causal_lm, load_scalar_model, save_pretrained,
                         sequence_scores)
from rlhf.rollout import full_sequence, generate, is_stop, response_logprobs, response_values, torch_linear
from rlhf.trainers.base import Trainer


@dataclass
class Experience:
    """One rank's share of a rollout batch. Shapes: B rows, P prompt columns, R response columns."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R) pad after the first EOS
    action_mask: torch.Tensor  # (B, R) 1 up to and including the first EOS
    logprobs: torch.Tensor  # (B, R) policy at sampling time ("old" log-probs)
    ref_logprobs: torch.Tensor  # (B, R)
    values: torch.Tensor  # (B, R)
    scores: torch.Tensor  # (B,) reward-model scores, as the model gave them
    prompts: list[str]
    rewards: torch.Tensor | None = None  # (B, R)
    advantages: torch.Tensor | None = None  # (B, R)
    returns: torch.Tensor | None = None  # (B, R)

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        return full_sequence(self.prompt_ids, self.prompt_mask, self.response_ids, self.action_mask)

    def select(self, idx: torch.Tensor) -> "Experience":
        fields = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                fields[f.name] = v[idx.to(v.device)]
            elif isinstance(v, list):
                fields[f.name] = [v[i] for i in idx.tolist()]
            else:
                fields[f.name] = v
        return Experience(**fields)


class PPOTrainer(Trainer):
    stage = "ppo"
    plot_keys = ["ppo/score", "ppo/kl", "eval/score", "eval/gold_reward", "ppo/value_error"]
    progress_keys = ["ppo/score", "ppo/kl", "ppo/episodes_per_s"]

    cfg: PPOConfig

    # ================================================================== setup

    def make_sampler(self) -> StepSampler:
        bb, r = self.backbone, self.cfg.rollout
        self.prompts_per_rank = exact_div(r.batch_size, bb.world_size, "rollout.batch_size", "ranks")
        return StepSampler(len(self.data.train), r.batch_size, self.prompts_per_rank, bb.world_size, bb.rank,
                           self.cfg.seed)

    def build_models(self) -> None:
        cfg, bb = self.cfg, self.backbone
        micro = cfg.train.micro_batch_size
        self.minibatches = cfg.rollout.batch_size // cfg.train.global_batch_size
        optimizer_steps = self.total_steps * cfg.ppo.epochs * self.minibatches
        self.check_reward_tokenizer()

        # policy: the model being trained (actor)
        policy_cfg = self.role_model("policy")
        with bb.model_init(cfg.role_deepspeed("policy")):
            policy = load_causal_lm(policy_cfg, self.tokenizer, self.dtype, self.stop_ids)
        policy = apply_lora(policy, policy_cfg.lora, "CAUSAL_LM")
        self.policy = bb.wrap(policy, cfg.role_deepspeed("policy"), cfg.policy.optim, micro, self.accumulation,
                              optimizer_steps)
        # value: estimates future reward per token (critic), by default from the reward model
        value_cfg = self.role_model("value")
        with bb.model_init(cfg.role_deepspeed("value")):
            value = load_scalar_model(value_cfg, self.tokenizer, self.dtype, self.stop_ids)
        value = ScalarModel(apply_lora(value, value_cfg.lora, "SEQ_CLS"))
        self.value = bb.wrap(value, cfg.role_deepspeed("value"), cfg.value.optim, micro, self.accumulation,
                             optimizer_steps)
        # reward model and reference policy: frozen, inference-only engines
        with bb.model_init(cfg.role_deepspeed("reward"), trainable=False):
            reward = ScalarModel(load_scalar_model(cfg.reward.model, self.tokenizer, self.dtype, self.stop_ids))
        self.reward = bb.wrap(reward, cfg.role_deepspeed("reward"))
        with bb.model_init(cfg.role_deepspeed("ref_policy"), trainable=False):
            ref = load_causal_lm(self.role_model("ref_policy"), self.tokenizer, self.dtype, self.stop_ids)
        self.ref_policy = bb.wrap(ref, cfg.role_deepspeed("ref_policy"))
        self.engines = {"policy": self.policy, "value": self.value}

        self.kl_ctl = make_kl_controller(cfg.ppo.kl_controller, cfg.ppo.kl_coef, cfg.ppo.kl_target,
                                         cfg.ppo.kl_horizon)
        self.ema = [t.detach().clone() for t in self.ema_tensors()] if cfg.ppo.ema_decay else None
        self.ptx = None
        if cfg.ppo.ptx.coef > 0:
            ptx = bb.main_first(lambda: build_stage_data("sft", cfg.ppo.ptx.data, self.tokenizer))
            self.ptx = ptx.train
            self.ptx_sampler = StepSampler(len(self.ptx), cfg.train.global_batch_size, micro, bb.world_size,
                                           bb.rank, cfg.seed)
        self.gold_reward = None
        if cfg.task is not None:
            from rlhf.task import gold_reward

            self.gold_reward = gold_reward
        # Sampling must differ across ranks (same seed everywhere would give every rank
        # the same random stream); models are built, so this changes no initial weight.
        torch.manual_seed(cfg.seed * 1000 + bb.rank)

    def role_model(self, role: str) -> ModelConfig:
        """The model config of a role; the reference defaults to the policy's starting
        weights, and dropout is off in trained models when ppo.disable_dropout."""
        cfg = self.cfg
        m = getattr(cfg, role).model
        if role == "ref_policy" and m.path is None and m.arch is None:
            m = dataclasses.replace(cfg.policy.model, lora=dataclasses.replace(cfg.policy.model.lora, r=0),
                                    gradient_checkpointing=False)
        if cfg.ppo.disable_dropout and role in ("policy", "value", "ref_policy"):
            m = dataclasses.replace(m, dropout=0.0)
        return m

    def check_reward_tokenizer(self) -> None:
        """The reward model reads the policy's token ids directly, so it must share the
        tokenizer. Refuse a mismatch at start instead of scoring garbage."""
        from transformers import AutoTokenizer

        from rlhf.model_source import model_dir

        path = model_dir(self.cfg.reward.model)
        if path is None or not any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            return
        theirs = AutoTokenizer.from_pretrained(path)
        ours = self.tokenizer.get_vocab()
        if any(ours.get(tok) != i for tok, i in theirs.get_vocab().items()):
            raise ValueError(f"reward.model.path: the reward model at {path} uses a different tokenizer from the "
                             f"policy ({self.cfg.tokenizer.path or self.cfg.policy.model.path}); PPO needs one "
                             "shared vocabulary")

    # ================================================================== the loop

    def train(self) -> None:
        cfg = self.cfg
        if self.step == 0 and self.data.eval:
            self.log(self.evaluate())
        bar = self.progress_bar()
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            prompts = [self.data.train[i] for i in self.sampler.step(self.step)[0]]
            # 1. sample and score responses
            exp = self.make_experience(prompts)
            t1 = time.perf_counter()
            # 2. per-token rewards; 3. advantages
            exp.rewards = self.compute_rewards(exp)
            exp.advantages, exp.returns = self.compute_advantages(exp)
            # 4. PPO epochs over shuffled minibatches
            metrics = self.experience_metrics(exp)
            metrics.update(self.learn(exp))
            # 5. adapt the KL coefficient to the KL just measured
            self.kl_ctl.update(metrics["ppo/kl"], cfg.rollout.batch_size)
            self.update_ema()
            t2 = time.perf_counter()
            metrics.update({"time/generate_s": t1 - t0, "time/train_s": t2 - t1,
                            "ppo/episodes_per_s": cfg.rollout.batch_size / (t2 - t0)})
            if cfg.sample_every and self.step % cfg.sample_every == 0:
                self.write_samples(exp)
            self.step += 1
            self.end_step(metrics, bar)
        if bar is not None:
            bar.close()

    # ------------------------------------------------------------------ 1. experience

    @torch.no_grad()
    def make_experience(self, prompts: list[dict]) -> Experience:
        """Sample one response per prompt and record everything PPO needs about it."""
        dev = self.backbone.device
        batch = collate_prompts(prompts, self.tokenizer.pad_token_id)
        prompt_ids, prompt_mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        rollout = self.cfg.rollout
        response, action_mask, logprobs = generate(self.policy, prompt_ids, prompt_mask, rollout, self.tokenizer,
                                                   self.cfg.role_deepspeed("policy").zero_stage,
                                                   with_logprobs=rollout.logprobs_from_generation,
                                                   stop_ids=self.stop_ids)
        logprobs, ref_logprobs, values, scores = self.score_responses(prompt_ids, prompt_mask, response,
                                                                      action_mask, logprobs)
        return Experience(prompt_ids, prompt_mask, response, action_mask, logprobs, ref_logprobs, values, scores,
                          [p["prompt"] for p in prompts])

    @torch.no_grad()
    def score_responses(self, prompt_ids, prompt_mask, response, action_mask, logprobs=None):
        """Policy and reference log-probs, values `(B, R)` and reward scores `(B,)`, batched.
        The policy's pass is skipped when its log-probs came with the responses."""
        input_ids, attention_mask = full_sequence(prompt_ids, prompt_mask, response, action_mask)
        P, T = prompt_ids.shape[1], self.cfg.rollout.temperature
        chunk = self.cfg.train.eval_batch_size or self.cfg.train.micro_batch_size
        out: dict[str, list[torch.Tensor]] = {"logprobs": [], "ref": [], "values": [], "scores": []}
        self.policy.eval()
        self.value.eval()
        with torch_linear():
            for i in range(0, input_ids.shape[0], chunk):
                ids, mask = input_ids[i:i + chunk], attention_mask[i:i + chunk]
                if logprobs is None:
                    out["logprobs"].append(response_logprobs(self.policy, ids, mask, P, T))
                out["ref"].append(response_logprobs(self.ref_policy, ids, mask, P, T))
                out["values"].append(response_values(self.value, ids, mask, P))
                out["scores"].append(sequence_scores(self.reward, ids, mask))
        self.policy.train()
        self.value.train()
        if logprobs is not None:
            out["logprobs"] = [logprobs]
        return tuple(torch.cat(out[k]) for k in ("logprobs", "ref", "values", "scores"))

    # ------------------------------------------------------------------ 2. rewards

    def compute_rewards(self, exp: Experience) -> torch.Tensor:
        """Per-token rewards `(B, R)`: the KL penalty everywhere, the score at the end."""
        ppo = self.cfg.ppo
        scores = exp.scores
        if ppo.missing_eos_penalty is not None:
            scores = scores - ppo.missing_eos_penalty * (~self.has_eos(exp)).float()
        if ppo.normalize_scores:
            mean, var = self.global_mean_var(scores, torch.ones_like(scores))
            scores = (scores - mean) / (var.sqrt() + 1e-8)
        return reward_with_kl(scores, exp.logprobs, exp.ref_logprobs, exp.action_mask.float(), self.kl_ctl.value,
                              ppo.clip_score, ppo.kl_estimator)

    def has_eos(self, exp: Experience) -> torch.Tensor:
        return (is_stop(exp.response_ids, self.stop_ids) & exp.action_mask.bool()).any(dim=1)

    # ------------------------------------------------------------------ 3. advantages

    def compute_advantages(self, exp: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        """GAE advantages and returns `(B, R)`; advantages whitened over all ranks' action tokens."""
        ppo = self.cfg.ppo
        mask = exp.action_mask.float()
        advantages, returns = gae(exp.rewards, exp.values, mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            mean, var = self.global_mean_var(advantages, mask)
            advantages = (advantages - mean) * torch.rsqrt(var + 1e-8) * mask
        return advantages, returns

    def global_mean_var(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (unbiased) variance of x over the mask on every rank together."""
        s = self.backbone.all_reduce(torch.stack([masked_sum(x, mask), masked_sum(x * x, mask), mask.sum()]))
        n = s[2].clamp(min=2)
        mean = s[0] / n
        var = (s[1] / n - mean**2) * n / (n - 1)
        return mean.to(x.dtype), var.clamp(min=0).to(x.dtype)

    # ------------------------------------------------------------------ 4. learning

    def learn(self, exp: Experience) -> dict[str, float]:
        """ppo.epochs passes over the experience in shuffled minibatches; mean metrics."""
        cfg = self.cfg
        per_rank = cfg.train.global_batch_size // self.backbone.world_size
        micro = cfg.train.micro_batch_size
        totals: dict[str, float] = {}
        for epoch in range(cfg.ppo.epochs):
            # A generator of its own: the order depends on (seed, step, epoch, rank) only,
            # so a resumed run shuffles exactly as the uninterrupted one did.
            g = torch.Generator().manual_seed(hash((self.cfg.seed, self.step, epoch, self.backbone.rank)) % 2**62)
            perm = torch.randperm(self.prompts_per_rank, generator=g)
            for k in range(self.minibatches):
                idx = perm[k * per_rank:(k + 1) * per_rank]
                micro_batches = [exp.select(idx[j:j + micro]) for j in range(0, per_rank, micro)]
                stats = self.train_step(micro_batches)
                if epoch == 0 and k == 0:
                    # Nothing has been updated yet: new and old log-probs must agree.
                    totals["ppo/ratio_at_start"] = stats["ppo/ratio"]
                for key, v in stats.items():
                    totals[key] = totals.get(key, 0.0) + v / (cfg.ppo.epochs * self.minibatches)
        return totals

    def train_step(self, micro_batches: list[Experience]) -> dict[str, float]:
        """One optimizer step of the policy and one of the value model on a minibatch."""
        cfg, bb = self.cfg, self.backbone
        # Losses are sums over action tokens divided by the minibatch's action tokens on
        # all ranks (times accumulation x ranks, which DeepSpeed divides back out): a
        # token mean over the whole minibatch, whatever the micro-batch split.
        n_tokens = bb.all_reduce(sum(mb.action_mask.sum() for mb in micro_batches).float()).item()
        normalizer = max(n_tokens, 1.0) / (self.accumulation * bb.world_size)
        sums = torch.zeros(8, dtype=torch.float64)
        for mb in micro_batches:
            input_ids, attention_mask = mb.sequences()
            mask = mb.action_mask.float()
            P = mb.prompt_ids.shape[1]
            logprobs, entropy = response_logprobs(self.policy, input_ids, attention_mask, P,
                                                  cfg.rollout.temperature, with_entropy=True,
                                                  entropy_grad=cfg.ppo.entropy_coef > 0)
            pg_loss, pg_stats = policy_loss(logprobs, mb.logprobs, mb.advantages, mask, cfg.ppo.clip_range,
                                            normalizer)
            ent = masked_sum(entropy, mask) / normalizer
            loss = pg_loss - cfg.ppo.entropy_coef * ent if cfg.ppo.entropy_coef else pg_loss
            if self.ptx is not None:
                loss = loss + cfg.ppo.ptx.coef * self.ptx_loss()
            self.policy.backward(loss)
            bb.step(self.policy)

            values = response_values(self.value, input_ids, attention_mask, P)
            v_loss, v_stats = value_loss(values, mb.values, mb.returns, mask, cfg.ppo.value_clip_range, normalizer)
            self.value.backward(v_loss)
            bb.step(self.value)

            n = mask.sum().item()
            sums += torch.tensor([pg_loss.item() * normalizer, v_loss.item() * normalizer, ent.item() * normalizer,
                                  pg_stats["clipfrac"].item() * n, pg_stats["approx_kl"].item() * n,
                                  pg_stats["ratio"].item() * n, v_stats["clipfrac"].item() * n,
                                  v_stats["value_error"].item() * n], dtype=torch.float64)
        s = bb.all_reduce(sums) / max(n_tokens, 1.0)
        names = ["policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl", "ratio", "value_clipfrac",
                 "value_error"]
        stats = {f"ppo/{k}": s[i].item() for i, k in enumerate(names)}
        stats["ppo/policy_grad_norm"] = bb.grad_norm(self.policy)
        stats["ppo/value_grad_norm"] = bb.grad_norm(self.value)
        return stats

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

    # ------------------------------------------------------------------ metrics

    def experience_metrics(self, exp: Experience) -> dict[str, float]:
        """What the rollout looked like, averaged over all ranks."""
        mask = exp.action_mask.float()
        kl = masked_sum(exp.logprobs - exp.ref_logprobs, mask, dim=1)  # k1 per response
        rows = [exp.scores, exp.scores**2, kl, masked_sum(exp.rewards, mask, dim=1), mask.sum(1),
                self.has_eos(exp).float()]
        tok = [masked_sum(exp.returns, mask), masked_sum(exp.advantages, mask), mask.sum()]
        if self.gold_reward is not None:
            rows.append(torch.tensor(self.gold_rewards(exp), device=exp.scores.device))
        s = self.backbone.all_reduce(torch.stack([r.float().sum() for r in rows] + [t.float() for t in tok]
                                                 + [torch.tensor(float(len(exp.prompts)), device=mask.device)]))
        n, n_tok = s[-1].item(), s[-2].item()
        mean_score = s[0].item() / n
        out = {
            "ppo/score": mean_score,
            "ppo/score_std": max(s[1].item() / n - mean_score**2, 0.0) ** 0.5,
            "ppo/kl": s[2].item() / n,
            "ppo/kl_coef": self.kl_ctl.value,
            "ppo/reward": s[3].item() / n,
            "ppo/response_length": s[4].item() / n,
            "ppo/eos_rate": s[5].item() / n,
            "ppo/returns": s[len(rows)].item() / n_tok,
            "ppo/advantages": s[len(rows) + 1].item() / n_tok,
        }
        if self.gold_reward is not None:
            out["ppo/gold_reward"] = s[6].item() / n
        return out

    def decode_responses(self, response_ids: torch.Tensor, action_mask: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True)
                for r, m in zip(response_ids, action_mask)]

    def gold_rewards(self, exp: Experience) -> list[float]:
        texts = self.decode_responses(exp.response_ids, exp.action_mask)
        return [self.gold_reward(p, t) for p, t in zip(exp.prompts, texts)]

    def write_samples(self, exp: Experience, n: int = 4) -> None:
        if not self.backbone.is_main:
            return
        texts = self.decode_responses(exp.response_ids[:n], exp.action_mask[:n])
        with (self.out / "samples.jsonl").open("a") as f:
            for p, t, s in zip(exp.prompts, texts, exp.scores.tolist()):
                f.write(json.dumps({"step": self.step, "prompt": p, "response": t, "score": s}) + "\n")

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Responses to the held-out prompts: reward score, KL to the reference, length,
        EOS rate (and the built-in task's gold reward). Sampled with a fixed seed in a
        forked RNG, so evaluating does not change the training run."""
        cfg, bb = self.cfg, self.backbone
        size = cfg.rollout.micro_batch_size or self.prompts_per_rank
        sums = torch.zeros(6, dtype=torch.float64)
        with bb.fork_rng(cfg.seed + 7919 * (bb.rank + 1)):
            for idx, real in self.eval_index_batches(len(self.data.eval), size):
                # Every rank samples and scores batches of the same sizes (its passes are
                # collectives under ZeRO-3); only the first `real` rows are its own share.
                exp = self.make_experience([self.data.eval[i] for i in idx]).select(torch.arange(real))
                mask = exp.action_mask.float()
                kl = masked_sum(exp.logprobs - exp.ref_logprobs, mask, dim=1)
                gold = sum(self.gold_rewards(exp)) if self.gold_reward is not None else 0.0
                sums += torch.tensor([exp.scores.sum().item(), kl.sum().item(), mask.sum().item(),
                                      self.has_eos(exp).sum().item(), gold, real], dtype=torch.float64)
        s = bb.all_reduce(sums)
        n = max(s[5].item(), 1.0)
        out = {"eval/score": s[0].item() / n, "eval/kl": s[1].item() / n, "eval/response_length": s[2].item() / n,
               "eval/eos_rate": s[3].item() / n}
        if self.gold_reward is not None:
            out["eval/gold_reward"] = s[4].item() / n
        return out

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
        return {**super().state(), "kl_controller": self.kl_ctl.state_dict(),
                "ptx_steps": getattr(self, "_ptx_calls", 0) // self.accumulation}

    def rank_state(self) -> dict[str, Any]:
        return {"ema": self.ema} if self.ema is not None else {}

    def load_state(self, state: dict[str, Any], rank_state: dict[str, Any]) -> None:
        self.kl_ctl.load_state_dict(state["kl_controller"])
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
        bb = self.backbone
        state = bb.full_state_dict(self.policy.module)
        value_state = bb.full_state_dict(self.value.module)
        if bb.is_main:
            save_pretrained(self.policy.module, state, self.tokenizer, out_dir)
            save_pretrained(self.value.module, value_state, self.tokenizer, out_dir / "value")
        if self.ema is not None:
            live = [t.clone() for t in self.ema_tensors()]
            for t, e in zip(self.ema_tensors(), self.ema):
                t.copy_(e)
            ema_state = bb.full_state_dict(self.policy.module)
            for t, v in zip(self.ema_tensors(), live):
                t.copy_(v)
            if bb.is_main:
                save_pretrained(self.policy.module, ema_state, self.tokenizer, out_dir / "ema")
