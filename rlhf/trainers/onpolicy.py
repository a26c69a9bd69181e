"""The on-policy loop that PPO, GRPO, RLOO and REINFORCE++ share (DESIGN.md, "On-policy stages").

One step, as `train` reads:

    1. rollout     - the rollout engine samples rollout.n responses to each prompt
    2. scores      - the reward sources score them (model, function, server, a sum)
    3. experience  - the policy's and the reference's log-probs, the critic's values
                     (each model makes one pass over the whole batch, in chunks)
    4. rewards and advantages - the algorithm's (GAE, group baselines, REINFORCE++)
    5. learn       - epochs x shuffled minibatches: the algorithm's losses, then a
                     backward and an optimizer step of each trained model
    6. sync        - the engine samples from the updated weights next time

Steps 1-3 are `make_experience`; `compute_rewards`, `compute_advantages`, `learn`
and `train_step` can each be overridden alone. Three parts are handed in and each
can be replaced alone: the rollout engine (rlhf.rollout), the reward sources
(rlhf.rewards) and the algorithm (`Algorithm`, rlhf/trainers/experience.py; a trainer
names its class).
All per-token tensors have the response's columns only (rlhf.rollout.hf).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from math import gcd
from pathlib import Path
from typing import Any

import torch

from rlhf.config import ModelConfig, OnPolicyConfig, exact_div
from rlhf.data.batching import StepSampler, budget_chunks
from rlhf.losses import masked_sum
from rlhf.models import (ScalarModel, apply_lora, load_causal_lm, load_scalar_model, model_type, require_model_type,
                         save_pretrained, sequence_scores)
from rlhf.rewards import RewardSources
from rlhf.rollout import HFEngine, full_sequence, generation_context, is_stop, response_logprobs, response_values
from rlhf.rollout.groups import GroupLayout, group_layout, group_logprobs, group_values
from rlhf.trainers.base import Trainer
from rlhf.trainers.experience import Algorithm, Experience

__all__ = ["Algorithm", "Experience", "OnPolicyTrainer"]


class OnPolicyTrainer(Trainer):
    """The loop; a stage names its `algorithm_class` (and the stage name)."""

    algorithm_class: type[Algorithm] = Algorithm
    cfg: OnPolicyConfig

    def __init__(self, cfg: OnPolicyConfig, backbone=None):
        super().__init__(cfg, backbone)
        s = self.stage
        self.plot_keys = [f"{s}/score", f"{s}/kl", "eval/score", "eval/gold_reward"] + self.plot_keys
        self.progress_keys = [f"{s}/score", f"{s}/kl", f"{s}/episodes_per_s"]
        self.timers: dict[str, float] = {}
        self.entropy_logged = True
        self.evaluating = False  # make_experience for evaluate: no update follows, old log-probs are scored

    # ================================================================== setup

    def make_sampler(self) -> StepSampler:
        bb, r = self.backbone, self.cfg.rollout
        self.prompts_per_rank = exact_div(r.batch_size, bb.world_size, "rollout.batch_size", "ranks")
        return StepSampler(len(self.data.train), r.batch_size, self.prompts_per_rank, bb.world_size, bb.rank,
                           self.cfg.seed)

    def build_models(self) -> None:
        cfg, bb = self.cfg, self.backbone
        micro = cfg.train.micro_batch_size
        self.algorithm = self.algorithm_class(cfg, self)
        self.minibatches = cfg.rollout.batch_size * cfg.rollout.n // cfg.train.global_batch_size
        optimizer_steps = self.total_steps * self.algorithm.hp.epochs * self.minibatches
        self.check_reward_tokenizer()
        if self.shared_prefix:
            from rlhf.trainers.reward import SHARED_PREFIX_MODEL_TYPES

            roles = ["policy"] + ["value"] * self.algorithm.critic + ["ref_policy"] * self.algorithm.uses_reference
            for role in roles:
                require_model_type(model_type(self.role_model(role)), SHARED_PREFIX_MODEL_TYPES,
                                   "rollout.shared_prefix", "honour custom attention masks")

        # policy: the model being trained (actor)
        policy_cfg = self.role_model("policy")
        with bb.model_init(cfg.role_deepspeed("policy")):
            policy = load_causal_lm(policy_cfg, self.tokenizer, self.dtype, self.stop_ids)
        policy = apply_lora(policy, policy_cfg.lora, "CAUSAL_LM")
        self.policy = bb.wrap(policy, cfg.role_deepspeed("policy"), cfg.policy.optim, micro, self.accumulation,
                              optimizer_steps)
        self.engines = {"policy": self.policy}
        self.value = None
        if self.algorithm.critic:
            # value: estimates future reward per token (critic), by default from the reward model
            value_cfg = self.role_model("value")
            with bb.model_init(cfg.role_deepspeed("value")):
                value = load_scalar_model(value_cfg, self.tokenizer, self.dtype, self.stop_ids)
            value = ScalarModel(apply_lora(value, value_cfg.lora, "SEQ_CLS"))
            self.value = bb.wrap(value, cfg.role_deepspeed("value"), cfg.value.optim, micro, self.accumulation,
                                 optimizer_steps)
            self.engines["value"] = self.value
        # reward model and reference policy: frozen, inference-only engines
        self.reward = None
        if cfg.reward.has_model():
            with bb.model_init(cfg.role_deepspeed("reward"), trainable=False):
                reward = ScalarModel(load_scalar_model(cfg.reward.model, self.tokenizer, self.dtype, self.stop_ids))
            self.reward = bb.wrap(reward, cfg.role_deepspeed("reward"))
        self.ref_policy = None
        if self.algorithm.uses_reference:
            with bb.model_init(cfg.role_deepspeed("ref_policy"), trainable=False):
                ref = load_causal_lm(self.role_model("ref_policy"), self.tokenizer, self.dtype, self.stop_ids)
            self.ref_policy = bb.wrap(ref, cfg.role_deepspeed("ref_policy"))
        self.rewards = RewardSources(cfg.reward)
        self.engine = self.make_rollout_engine()
        self.gold_reward = None
        if cfg.task is not None:
            from rlhf.task import gold_function

            self.gold_reward = gold_function(cfg.task)
        self.build_extras()
        # Sampling must differ across ranks (same seed everywhere would give every rank
        # the same random stream); models are built, so this changes no initial weight.
        torch.manual_seed(cfg.seed * 1000 + bb.rank)

    def make_rollout_engine(self):
        """rollout.engine: decoding on the policy's own engine (hf), or vLLM (rlhf.rollout.vllm)."""
        cfg = self.cfg
        if cfg.rollout.engine == "vllm":
            from rlhf.rollout.vllm import VLLMEngine

            max_len = (cfg.data.max_prompt_length or cfg.data.max_length) + cfg.rollout.max_new_tokens
            return VLLMEngine(self.policy, cfg.rollout, self.tokenizer, self.backbone, self.stop_ids, cfg.seed,
                              max_len)
        return HFEngine(self.policy, cfg.rollout, self.tokenizer, cfg.role_deepspeed("policy").zero_stage,
                        self.stop_ids)

    def build_extras(self) -> None:
        """What a stage adds to its models (PPO: EMA, ptx data), before sampling is seeded."""

    def role_model(self, role: str) -> ModelConfig:
        """The model config of a role; the reference defaults to the policy's starting
        weights, and dropout is off in trained models when the hyperparameters say so."""
        cfg = self.cfg
        m = getattr(cfg, role).model
        if role == "ref_policy" and m.path is None and m.arch is None:
            m = dataclasses.replace(cfg.policy.model, lora=dataclasses.replace(cfg.policy.model.lora, r=0),
                                    gradient_checkpointing=False)
        if self.algorithm.hp.disable_dropout and role in ("policy", "value", "ref_policy"):
            m = dataclasses.replace(m, dropout=0.0)
        if self.shared_prefix and role in ("policy", "value", "ref_policy") and m.attn_implementation == "auto":
            # The shared-prefix layout needs a custom mask, which FlashAttention does not take.
            m = dataclasses.replace(m, attn_implementation="sdpa")
        return m

    @property
    def shared_prefix(self) -> bool:
        """Whether a group's responses share one copy of its prompt (rollout.shared_prefix)."""
        return self.cfg.rollout.shared_prefix and self.cfg.rollout.n > 1

    def check_reward_tokenizer(self) -> None:
        """The reward model reads the policy's token ids directly, so it must share the
        tokenizer. Refuse a mismatch at start instead of scoring garbage."""
        from transformers import AutoTokenizer

        from rlhf.model_source import model_dir

        if not self.cfg.reward.has_model():
            return
        path = model_dir(self.cfg.reward.model)
        if path is None or not any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            return
        theirs = AutoTokenizer.from_pretrained(path)
        ours = self.tokenizer.get_vocab()
        if any(ours.get(tok) != i for tok, i in theirs.get_vocab().items()):
            raise ValueError(f"reward.model.path: the reward model at {path} uses a different tokenizer from the "
                             f"policy ({self.cfg.tokenizer.path or self.cfg.policy.model.path}); "
                             f"{self.stage.upper()} needs one shared vocabulary")

    # ================================================================== the loop

    def train(self) -> None:
        cfg = self.cfg
        if self.step == 0 and self.data.eval:
            self.log(self.evaluate())
        bar = self.progress_bar()
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            prompts = [self.data.train[i] for i in self.sampler.step(self.step)[0]]
            # 1.-3. sample rollout.n responses per prompt, score them, record log-probs (and values)
            exp = self.make_experience(prompts)
            t1 = time.perf_counter()
            # 4. rewards, then advantages (and returns)
            exp.rewards = self.compute_rewards(exp)
            exp.advantages, exp.returns = self.compute_advantages(exp)
            # 5. epochs over shuffled minibatches: losses, backward, step of each trained model
            learned = self.learn(exp)
            # after learn: without the old-log-prob pass the update fills exp.logprobs (for the KL)
            metrics = self.experience_metrics(exp)
            metrics.update(learned)
            # 6. the rollout engine samples from the new weights next time
            self.engine.sync_weights(self.policy)
            self.after_step(metrics)
            t2 = time.perf_counter()
            metrics.update(self.timers)
            metrics.update({"time/experience_s": t1 - t0, "time/train_s": t2 - t1,
                            f"{self.stage}/episodes_per_s": cfg.rollout.batch_size * cfg.rollout.n / (t2 - t0)})
            if cfg.sample_every and self.step % cfg.sample_every == 0:
                self.write_samples(exp)
            self.step += 1
            self.end_step(metrics, bar)
        if bar is not None:
            bar.close()

    def after_step(self, metrics: dict[str, float]) -> None:
        self.algorithm.after_step(metrics)

    # ------------------------------------------------------------------ 1.-3. experience

    @torch.no_grad()
    def make_experience(self, prompts: list[dict], n: int | None = None) -> Experience:
        """Sample `n` (default rollout.n) responses per prompt and record everything the
        algorithm needs about them."""
        t0 = time.perf_counter()
        rollout = self.engine.generate(prompts, self.cfg.rollout.n if n is None else n)
        self.timers = {"time/generate_s": time.perf_counter() - t0}
        passes = self.forward_passes(rollout)
        texts = [p["prompt"] for p in rollout.rows]
        responses = self.decode_responses(rollout.response_ids, rollout.action_mask) if self.rewards.text_sources \
            else []
        scores = self.rewards.score(passes.get("scores"), texts, responses, rollout.rows)
        self.timers.update({f"time/reward_{k}_s": v for k, v in self.rewards.timings.items()})
        return Experience(rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.action_mask,
                          passes.get("logprobs"), passes.get("ref_logprobs"), passes.get("values"),
                          scores.to(rollout.prompt_ids.device), texts, rollout.rows,
                          responses=responses if self.rewards.text_sources else None)

    @torch.no_grad()
    def forward_passes(self, rollout) -> dict[str, torch.Tensor]:
        """Policy and reference log-probs, values `(B, R)` and reward-model scores `(B,)`.
        Each model runs over the whole batch in chunks before the next starts, so under
        ZeRO-3 its weights are gathered once for all chunks. The policy's pass is
        skipped when its log-probs came with the responses, or when the update will
        give them (`old_logprobs_from_update`; then there is no "logprobs" entry)."""
        tensors = (rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.action_mask)
        spans = self.micro_batch_spans(rollout.prompt_mask, rollout.action_mask,
                                       self.cfg.train.eval_batch_size or self.cfg.train.micro_batch_size)
        # the models' inputs chunk by chunk (one row per group with rollout.shared_prefix) ...
        inputs = [self.model_inputs(*(t[a:b] for t in tensors)) for a, b in spans]
        policy_chunk = self.cfg.policy.model.logits_chunk_mib
        passes = []
        if rollout.logprobs is None and not self.old_logprobs_from_update():
            passes.append(("logprobs", "policy", lambda m, x: self.response_logprobs(m, x, chunk_mib=policy_chunk)))
        if self.ref_policy is not None:
            ref_chunk = self.role_model("ref_policy").logits_chunk_mib
            passes.append(("ref_logprobs", "ref_policy",
                           lambda m, x: self.response_logprobs(m, x, chunk_mib=ref_chunk)))
        if self.value is not None:
            passes.append(("values", "value", self.response_values))
        if self.reward is not None:
            # ... but the reward model reads each response in its own row
            passes.append(("scores", "reward", lambda m, x: sequence_scores(m, *x)))
        rows = [full_sequence(*(t[a:b] for t in tensors)) for a, b in spans] if self.reward is not None else []
        out = {}
        for engine in self.engines.values():
            engine.eval()
        for name, role, fn in passes:
            t0 = time.perf_counter()
            engine = getattr(self, role)
            with generation_context(engine, self.cfg.role_deepspeed(role).zero_stage):
                out[name] = torch.cat([fn(engine, x) for x in (rows if name == "scores" else inputs)])
            self.timers[f"time/score_{role}_s"] = time.perf_counter() - t0
        for engine in self.engines.values():
            engine.train()
        if rollout.logprobs is not None:
            out["logprobs"] = rollout.logprobs
        return out

    def group_size(self, rows: int) -> int:
        """Responses after each copy of a prompt in a batch of `rows` consecutive rows
        (a micro-batch, a scoring chunk) that starts at a multiple of its size in a
        rollout batch of whole groups: gcd(rows, rollout.n), since each aligned block of
        that many rows answers one prompt; 1 (separate rows) without the shared-prefix
        layout or when evaluating (one response per prompt)."""
        return gcd(rows, self.cfg.rollout.n) if self.shared_prefix and not self.evaluating else 1

    def micro_batch_spans(self, prompt_mask: torch.Tensor, action_mask: torch.Tensor,
                          rows_each: int) -> list[tuple[int, int]]:
        """(start, end) of each micro-batch (or scoring chunk) of these rows, in order:
        `rows_each` rows, or with train.micro_batch_tokens as many whole units as fit
        that many tokens (rlhf.data.batching.budget_chunks): groups in the shared-prefix
        layout (a unit's width is its packed row: the prompt and its responses' tokens),
        else rows (the batch's full width each). Every rank gets the same number: the
        largest any rank needs (one all-reduce). Evaluation keeps `rows_each`."""
        rows, budget = prompt_mask.shape[0], self.cfg.train.micro_batch_tokens
        if budget is None or self.evaluating:
            sizes = [min(rows_each, rows - i) for i in range(0, rows, rows_each)]
        else:
            unit = self.group_size(rows)
            if unit > 1:
                lengths = action_mask.sum(1).view(-1, unit).sum(1) + prompt_mask[::unit].sum(1)
                widths = [int(w) for w in lengths]
            else:
                widths = [prompt_mask.shape[1] + action_mask.shape[1]] * rows
            fewest = torch.tensor(len(budget_chunks(widths, budget)))
            count = int(self.backbone.all_reduce(fewest, "max").item())
            sizes = [n * unit for n in budget_chunks(widths, budget, count)]
        ends = list(itertools.accumulate(sizes))
        return list(zip([0] + ends[:-1], ends))

    def model_inputs(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                     action_mask: torch.Tensor) -> GroupLayout | tuple[torch.Tensor, torch.Tensor, int]:
        """What the policy, reference and value model read for these rows: one row per
        group (rlhf.rollout.groups), else each prompt + response (input_ids, attention_mask,
        prompt width)."""
        group = self.group_size(prompt_ids.shape[0])
        if group > 1:
            return group_layout(prompt_ids, prompt_mask, response_ids, action_mask, group)
        return (*full_sequence(prompt_ids, prompt_mask, response_ids, action_mask), prompt_ids.shape[1])

    def response_logprobs(self, model, inputs, **kwargs):
        """rlhf.rollout.response_logprobs (its keyword arguments) of `model_inputs`."""
        if isinstance(inputs, GroupLayout):
            return group_logprobs(model, inputs, self.cfg.rollout.temperature, **kwargs)
        return response_logprobs(model, *inputs, self.cfg.rollout.temperature, **kwargs)

    def response_values(self, model, inputs) -> torch.Tensor:
        """rlhf.rollout.response_values of `model_inputs`."""
        return group_values(model, inputs) if isinstance(inputs, GroupLayout) else response_values(model, *inputs)

    def old_logprobs_from_update(self) -> bool:
        """Whether the policy's "old" log-probs come from the update's own forward
        (detached, as in TRL's GRPOTrainer) instead of a scoring pass. Exact, hence no
        knob: with one optimizer step per rollout batch (one epoch, one minibatch) every
        micro-batch of that step runs on the weights that sampled the rollout, and with
        dropout off the train-mode forward computes what the scoring pass would (up to
        the rounding of another batch shape); the ratio new/old is then 1 by
        construction. Not when the rewards read the old log-probs before the update (a
        KL in the reward: PPO, REINFORCE++, RLOO's kl_in=reward), nor for evaluation."""
        hp = self.algorithm.hp
        return (not self.evaluating and hp.epochs == 1 and self.minibatches == 1 and hp.disable_dropout
                and not self.algorithm.rewards_use_logprobs)

    # ------------------------------------------------------------------ 4. rewards and advantages

    def compute_rewards(self, exp: Experience) -> torch.Tensor:
        return self.algorithm.compute_rewards(exp)

    def compute_advantages(self, exp: Experience) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.algorithm.compute_advantages(exp)

    def has_eos(self, exp: Experience) -> torch.Tensor:
        return (is_stop(exp.response_ids, self.stop_ids) & exp.action_mask.bool()).any(dim=1)

    def global_mean_var(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (unbiased) variance of x over the mask on every rank together."""
        s = self.backbone.all_reduce(torch.stack([masked_sum(x, mask), masked_sum(x * x, mask), mask.sum()]))
        n = s[2].clamp(min=2)
        mean = s[0] / n
        var = (s[1] / n - mean**2) * n / (n - 1)
        return mean.to(x.dtype), var.clamp(min=0).to(x.dtype)

    def sum_over_ranks(self, sums: dict[str, float | torch.Tensor]) -> dict[str, float]:
        """Each named sum added up over all ranks, in one all-reduce (float64)."""
        names = sorted(sums)
        t = torch.tensor([float(sums[k]) for k in names], dtype=torch.float64)
        t = self.backbone.all_reduce(t)
        return {k: t[i].item() for i, k in enumerate(names)}

    # ------------------------------------------------------------------ 5. learning

    def learn(self, exp: Experience) -> dict[str, float]:
        """Epochs over the experience in shuffled minibatches; mean metrics."""
        cfg = self.cfg
        per_rank = cfg.train.global_batch_size // self.backbone.world_size
        micro = cfg.train.micro_batch_size
        epochs = self.algorithm.hp.epochs
        totals: dict[str, float] = {}
        seen: dict[str, int] = {}
        # No old-log-prob pass ran (old_logprobs_from_update): train_step fills each micro-batch's.
        from_update = exp.logprobs is None
        old_logprobs = torch.zeros(exp.action_mask.shape, device=exp.action_mask.device) if from_update else None
        self.update_time = {"policy": 0.0, "value": 0.0}
        for epoch in range(epochs):
            # A generator of its own: the order depends on (seed, step, epoch, rank) only,
            # so a resumed run shuffles exactly as the uninterrupted one did.
            g = torch.Generator().manual_seed(hash((self.cfg.seed, self.step, epoch, self.backbone.rank)) % 2**62)
            if self.shared_prefix:  # whole groups, so that micro-batches hold whole groups (group_size)
                perm = (torch.randperm(self.prompts_per_rank, generator=g)[:, None] * cfg.rollout.n
                        + torch.arange(cfg.rollout.n)).view(-1)
            else:
                perm = torch.randperm(self.prompts_per_rank * cfg.rollout.n, generator=g)
            for k in range(self.minibatches):
                idx = perm[k * per_rank:(k + 1) * per_rank]
                at = idx.to(exp.action_mask.device)
                spans = self.micro_batch_spans(exp.prompt_mask[at], exp.action_mask[at], micro)
                micro_batches = [exp.select(idx[a:b]) for a, b in spans]
                self.entropy_logged = epoch == 0 and k == 0  # a subsample for the log: see train_step
                stats = self.train_step(micro_batches)
                if from_update:
                    for (a, b), mb in zip(spans, micro_batches):
                        old_logprobs[idx[a:b].to(old_logprobs.device)] = mb.logprobs
                if epoch == 0 and k == 0:
                    # Nothing has been updated yet: new and old log-probs must agree (exactly
                    # 1 when the old ones are the update's own, old_logprobs_from_update).
                    totals[f"{self.stage}/ratio_at_start"] = stats[f"{self.stage}/ratio"]
                    seen[f"{self.stage}/ratio_at_start"] = 1
                for key, v in stats.items():
                    totals[key] = totals.get(key, 0.0) + v
                    seen[key] = seen.get(key, 0) + 1
        if from_update:
            exp.logprobs = old_logprobs
        out = {k: v / seen[k] for k, v in totals.items()}
        out["time/policy_update_s"] = self.update_time["policy"]
        if self.value is not None:
            out["time/value_update_s"] = self.update_time["value"]
        return out

    def train_step(self, micro_batches: list[Experience]) -> dict[str, float]:
        """One optimizer step of each trained model on a minibatch. The entropy is computed
        where the loss uses it, else (for the log) on the first minibatch of a step only
        (`entropy_logged`): it costs a pass over the logits."""
        bb, algo = self.backbone, self.algorithm
        per_mb = [algo.loss_counts(mb) for mb in micro_batches]
        counts = self.sum_over_ranks({k: sum(c[k] for c in per_mb) for k in per_mb[0]})
        scale = self.accumulation * bb.world_size
        n_tokens = counts["tokens"]
        entropy_in_loss = algo.hp.entropy_coef > 0
        sums: dict[str, float] = {}
        # By tokens (train.micro_batch_tokens), the number of micro-batches need not be the
        # accumulation steps DeepSpeed counts: mark the last one as the boundary ourselves
        # (the loss scale above does not depend on how many there are).
        trained = [e for e in (self.policy, self.value) if e is not None]
        by_tokens = self.cfg.train.micro_batch_tokens is not None
        for j, mb in enumerate(micro_batches):
            if by_tokens:
                for engine in trained:
                    engine.set_gradient_accumulation_boundary(j == len(micro_batches) - 1)
            t0 = time.perf_counter()
            inputs = self.model_inputs(mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.action_mask)
            out = self.response_logprobs(self.policy, inputs, with_entropy=self.entropy_logged or entropy_in_loss,
                                         entropy_grad=entropy_in_loss,
                                         chunk_mib=self.cfg.policy.model.logits_chunk_mib)
            logprobs, entropy = out if isinstance(out, tuple) else (out, None)
            if mb.logprobs is None:  # old_logprobs_from_update: the weights have not moved yet
                mb.logprobs = logprobs.detach()
            loss, stats = algo.policy_loss(mb, logprobs, entropy, counts, scale)
            if self.has_extra_policy_loss():
                loss = loss + self.extra_policy_loss()
            self.policy.backward(loss)
            bb.step(self.policy)
            add(sums, stats)
            t1 = time.perf_counter()
            self.update_time["policy"] += t1 - t0
            if self.value is not None:
                values = self.response_values(self.value, inputs)
                v_loss, v_stats = algo.value_loss(mb, values, counts, scale)
                self.value.backward(v_loss)
                bb.step(self.value)
                add(sums, v_stats)
                self.update_time["value"] += time.perf_counter() - t1
        if by_tokens:
            for engine in trained:
                engine.set_gradient_accumulation_boundary(None)
        s = self.sum_over_ranks(sums)
        stats = {f"{self.stage}/{k}": v / max(n_tokens, 1.0) for k, v in s.items() if k != "entropy_tokens"}
        if "entropy_tokens" in s:
            stats[f"{self.stage}/entropy"] = s["entropy"] / max(s["entropy_tokens"], 1.0)
        stats[f"{self.stage}/micro_batches"] = float(len(micro_batches))  # per rank (train.micro_batch_tokens)
        stats[f"{self.stage}/policy_grad_norm"] = bb.grad_norm(self.policy)
        if self.value is not None:
            stats[f"{self.stage}/value_grad_norm"] = bb.grad_norm(self.value)
        return stats

    def has_extra_policy_loss(self) -> bool:
        return False

    def extra_policy_loss(self) -> torch.Tensor:
        """A term added to the policy's loss on each micro-batch (PPO: ptx)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ metrics

    def experience_metrics(self, exp: Experience) -> dict[str, float]:
        """What the rollout looked like, averaged over all ranks (reduced by name)."""
        mask = exp.action_mask.float()
        rows = {"score": exp.scores.sum(), "score_sq": (exp.scores**2).sum(), "response_length": mask.sum(),
                "eos_rate": self.has_eos(exp).float().sum(), "n": float(len(exp.prompts))}
        if exp.ref_logprobs is not None:
            rows["kl"] = masked_sum(exp.logprobs - exp.ref_logprobs, mask, dim=1).sum()  # k1 per response
        if exp.rewards is not None:
            rows["reward"] = (masked_sum(exp.rewards, mask, dim=1) if exp.rewards.dim() == 2 else exp.rewards).sum()
        tok = {"n_tok": mask.sum(), "advantages": masked_sum(exp.advantages * torch.ones_like(mask), mask)}
        if exp.returns is not None:
            tok["returns"] = masked_sum(exp.returns, mask)
        if self.gold_reward is not None:
            rows["gold_reward"] = sum(self.gold_rewards(exp))
        extra = self.algorithm.metrics(exp)
        s = self.sum_over_ranks({**rows, **tok, **extra})
        n, n_tok, st = s.pop("n"), s.pop("n_tok"), self.stage
        mean_score = s.pop("score") / n
        out = {f"{st}/score": mean_score, f"{st}/score_std": max(s.pop("score_sq") / n - mean_score**2, 0.0) ** 0.5,
               f"{st}/kl_coef": self.algorithm.kl_coef}
        for k in tok:
            if k != "n_tok":
                out[f"{st}/{k}"] = s.pop(k) / n_tok
        out.update({f"{st}/{k}": v / n for k, v in s.items()})
        return out

    def decode_responses(self, response_ids: torch.Tensor, action_mask: torch.Tensor) -> list[str]:
        """The responses' text (their action tokens), in one batched call of the tokenizer."""
        ids = [[t for t, m in zip(r, k) if m] for r, k in zip(response_ids.tolist(), action_mask.tolist())]
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def gold_rewards(self, exp: Experience) -> list[float]:
        texts = exp.responses if exp.responses is not None else self.decode_responses(exp.response_ids,
                                                                                     exp.action_mask)
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
        """One response to each held-out prompt: score, KL to the reference, length, EOS
        rate (and the built-in task's gold reward). Sampled with a fixed seed in a forked
        RNG, so evaluating does not change the training run."""
        cfg, bb = self.cfg, self.backbone
        size = cfg.rollout.micro_batch_size or self.prompts_per_rank
        sums = {"score": 0.0, "kl": 0.0, "response_length": 0.0, "eos_rate": 0.0, "gold_reward": 0.0, "n": 0.0}
        # One response per prompt; `n` only passed where it differs, so that overrides of
        # make_experience(prompts) written for PPO keep working.
        one = {} if cfg.rollout.n == 1 else {"n": 1}
        self.evaluating = True
        with bb.fork_rng(cfg.seed + 7919 * (bb.rank + 1)):
            for idx, real in self.eval_index_batches(len(self.data.eval), size):
                # Every rank samples and scores batches of the same sizes (its passes are
                # collectives under ZeRO-3); only the first `real` rows are its own share.
                exp = self.make_experience([self.data.eval[i] for i in idx], **one).select(torch.arange(real))
                mask = exp.action_mask.float()
                if exp.ref_logprobs is not None:
                    sums["kl"] += masked_sum(exp.logprobs - exp.ref_logprobs, mask, dim=1).sum().item()
                sums["score"] += exp.scores.sum().item()
                sums["response_length"] += mask.sum().item()
                sums["eos_rate"] += self.has_eos(exp).sum().item()
                sums["gold_reward"] += sum(self.gold_rewards(exp)) if self.gold_reward is not None else 0.0
                sums["n"] += real
        self.evaluating = False
        s = self.sum_over_ranks(sums)
        n = max(s.pop("n"), 1.0)
        if self.gold_reward is None:
            s.pop("gold_reward")
        if self.ref_policy is None:
            s.pop("kl")
        return {f"eval/{k}": v / n for k, v in s.items()}

    # ------------------------------------------------------------------ state, export

    def state(self) -> dict[str, Any]:
        return {**super().state(), **self.algorithm.state_dict()}

    def load_state(self, state: dict[str, Any], rank_state: dict[str, Any]) -> None:
        self.algorithm.load_state_dict(state)
        self.engine.sync_weights(self.policy)  # the engine started from the initial weights

    def export(self, out_dir: Path) -> None:
        """final/ holds the policy (final/value/ the value model, with a critic)."""
        bb = self.backbone
        state = bb.full_state_dict(self.policy)
        value_state = bb.full_state_dict(self.value) if self.value is not None else None
        if bb.is_main:
            save_pretrained(self.policy.module, state, self.tokenizer, out_dir)
            if value_state is not None:
                save_pretrained(self.value.module, value_state, self.tokenizer, out_dir / "value")


def add(sums: dict[str, float], stats: dict[str, float]) -> None:
    for k, v in stats.items():
        sums[k] = sums.get(k, 0.0) + float(v)
