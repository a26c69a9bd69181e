"""Typed configs for every stage: YAML in, dotted overrides on top, validated before work.

One dataclass tree per stage (``SFTConfig``, ``RMConfig``, ``PPOConfig``) built
from shared groups. Help text lives once, in the docstring under each field.

A config file is either a single stage (its top-level keys are the stage's
fields) or a multi-stage file with ``sft:``, ``rm:`` and ``ppo:`` sections:
top-level keys outside those sections are shared defaults for every stage,
``output_dir`` at the top is the root and each stage writes to
``<root>/<stage>`` unless its section says otherwise, and string values may
name ``${output_dir}`` (the root). Overrides (``optim.lr=1e-5``) are relative
to the stage's section. Every error names the key and where its value came
from (``configs/x.yaml:12`` or the command line).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhf.task import TaskConfig

STAGES = ("sft", "rm", "ppo")


class ConfigError(ValueError):
    """A config value is wrong. The message names the key and where it came from."""


# --------------------------------------------------------------------------- groups


@dataclass
class LoraConfig:
    r: int = 0
    """LoRA rank; 0 turns LoRA off and trains every weight."""
    alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch."""
    target_modules: list[str] | None = None
    """Module names to adapt, e.g. [q_proj, v_proj]; None adapts every linear layer but the head."""

    def validate(self, v: Validator) -> None:
        v.check(self.r >= 0, "r", f"must be >= 0, got {self.r}")
        v.check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        v.check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class ModelConfig:
    path: str | None = None
    """A Hugging Face model directory or hub name to load weights from."""
    arch: dict[str, Any] | None = None
    """Build a randomly initialised model from this HF config instead of loading one,
    e.g. {model_type: llama, hidden_size: 64, num_hidden_layers: 2}. Exclusive with `path`."""
    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint to run. Off unless you trust it."""
    attn_implementation: str | None = None
    """HF attention backend (sdpa, eager, flash_attention_2); None lets transformers choose."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    dropout: float | None = None
    """Set every dropout probability in the model config to this; None keeps the model's own."""
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self, v: Validator) -> None:
        v.check(self.path is not None or self.arch is not None, "path",
                "set model.path (a HF model directory or hub name) or model.arch (a config to build from)")
        v.check(self.path is None or self.arch is None, "arch", "set model.path or model.arch, not both")
        if self.arch is not None:
            v.check("model_type" in self.arch, "arch", "needs a model_type, e.g. llama, gpt2, opt")
        if self.dropout is not None:
            v.check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        v.sub("lora", self.lora)


@dataclass
class TokenizerConfig:
    path: str | None = None
    """Tokenizer directory or hub name; None uses model.path."""
    pad_token: str = "<|pad|>"
    """Added as the pad token when the tokenizer has none or pads with EOS (then the
    embeddings are resized). Pad and EOS must differ: masks are built from positions,
    and a pad equal to EOS hides every generated EOS."""
    chat_template: str | None = None
    """A Jinja chat template (or a path to a file holding one) replacing the tokenizer's."""


@dataclass
class SourceConfig:
    path: str | None = None
    """A local JSONL, JSON or Parquet file."""
    name: str | None = None
    """A dataset for `datasets.load_dataset` (hub name or local dataset directory)."""
    subset: str | None = None
    """The dataset's configuration name, for `name`."""
    split: str = "train"
    """Which split of `name` to read."""
    weight: float = 1.0
    """Mixture weight: the share of the mixed dataset drawn from this source."""

    def validate(self, v: Validator) -> None:
        v.check((self.path is None) != (self.name is None), "path",
                "set exactly one of path (a local file) and name (a datasets name)")
        v.check(self.weight > 0, "weight", f"must be > 0, got {self.weight}")
        if self.path is not None:
            v.check(Path(self.path).exists(), "path", f"no such file: {self.path}")
            v.check(Path(self.path).suffix in (".jsonl", ".json", ".parquet"), "path",
                    f"unsupported file type {Path(self.path).suffix!r}: use .jsonl, .json or .parquet")

    def describe(self) -> str:
        if self.path is not None:
            return self.path
        return f"{self.name}" + (f"/{self.subset}" if self.subset else "") + f"[{self.split}]"


@dataclass
class DataConfig:
    path: str | None = None
    """A local JSONL, JSON or Parquet file to train on (shorthand for one source)."""
    name: str | None = None
    """A dataset name for `datasets.load_dataset` (shorthand for one source)."""
    subset: str | None = None
    """Configuration name of `name`."""
    split: str = "train"
    """Split of `name` to train on."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A weighted mixture of sources instead of path/name."""
    eval: SourceConfig | None = None
    """Held-out data; None holds out `eval_ratio` of the training rows."""
    eval_ratio: float = 0.0
    """Fraction of training rows held out for evaluation when `eval` is not set."""
    stage_split: list[float] | None = None
    """Give each stage a disjoint share of one dataset, e.g. [2, 4, 4] for SFT, RM, PPO
    (DeepSpeed-Chat's data_split). Deterministic in `seed`."""
    format: str = "auto"
    """Row format; auto detects it from the keys of the first row."""
    columns: dict[str, str] = field(default_factory=dict)
    """Rename columns before reading, e.g. {question: prompt, answer: response}."""
    max_length: int = 512
    """Maximum tokens of prompt + response."""
    max_prompt_length: int | None = None
    """Maximum prompt tokens (PPO prompts; RM left-truncation keeps at most this much)."""
    truncation: Literal["right", "left", "drop"] = "right"
    """What to do with a sample over max_length. SFT: `right` cuts the response, `drop`
    drops the sample. RM: `left` cuts the prompt from its start, `drop` drops the pair.
    A sample whose prompt alone does not fit is always dropped and counted."""
    packing: bool = False
    """Pack several SFT samples into each sequence; attention never crosses samples."""
    skip_bad_rows: bool = False
    """Skip malformed rows (and report how many) instead of stopping at the first one."""
    max_samples: int | None = None
    """Use at most this many training rows (after mixing and splitting)."""
    seed: int = 1234
    """Seed for splits and mixtures (separate from the training seed, so that a
    change of training seed does not change which rows are held out)."""
    cache_dir: str | None = None
    """Where tokenized data is cached; None uses $RLHF_CACHE or ~/.cache/rlhf."""

    def all_sources(self) -> list[SourceConfig]:
        if self.sources:
            return self.sources
        return [SourceConfig(path=self.path, name=self.name, subset=self.subset, split=self.split)]

    def validate(self, v: Validator) -> None:
        if self.sources:
            v.check(self.path is None and self.name is None, "sources", "set sources or path/name, not both")
            for i, s in enumerate(self.sources):
                v.sub(f"sources.{i}", s)
        else:
            v.check(self.path is not None or self.name is not None, "path",
                    "no training data: set data.path (a local file) or data.name (a datasets name)")
            v.check(self.path is None or self.name is None, "name", "set data.path or data.name, not both")
            if self.path is not None:
                v.sub("", SourceConfig(path=self.path))
        if self.eval is not None:
            v.sub("eval", self.eval)
        v.check(0 <= self.eval_ratio < 1, "eval_ratio", f"must be in [0, 1), got {self.eval_ratio}")
        if self.stage_split is not None:
            v.check(len(self.stage_split) == 3 and all(x >= 0 for x in self.stage_split)
                    and sum(self.stage_split) > 0, "stage_split",
                    f"needs three non-negative shares for sft, rm, ppo, e.g. [2, 4, 4]; got {self.stage_split}")
        v.check(self.max_length > 1, "max_length", f"must be > 1, got {self.max_length}")
        if self.max_prompt_length is not None:
            v.check(0 < self.max_prompt_length < self.max_length, "max_prompt_length",
                    f"must be in (0, max_length={self.max_length}), got {self.max_prompt_length}")
        if self.max_samples is not None:
            v.check(self.max_samples > 0, "max_samples", f"must be > 0, got {self.max_samples}")


@dataclass
class OptimConfig:
    lr: float = 1e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (not applied to biases and norms)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warmup (transformers' schedulers)."""
    warmup_steps: int = 0
    """Linear warmup over this many optimizer steps."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of all optimizer steps (used when warmup_steps is 0)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off."""

    def validate(self, v: Validator) -> None:
        v.check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        v.check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        v.check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
                f"needs two values in [0, 1), got {self.betas}")
        v.check(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        v.check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        v.check(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        v.check(self.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    """ZeRO stage: 0 plain data parallel, 1 shards optimizer states, 2 also gradients,
    3 also parameters."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision. bf16 needs a GPU (Ampere or newer) to be fast; fp16 needs CUDA."""
    offload_optimizer: bool = False
    """Keep optimizer states on the CPU (ZeRO-Offload; needs zero_stage >= 1)."""
    offload_params: bool = False
    """Keep parameters on the CPU between uses (needs zero_stage 3)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Merged last into the generated DeepSpeed JSON, for settings not named here
    (e.g. {zero_optimization: {reduce_bucket_size: 5e8}})."""

    def validate(self, v: Validator) -> None:
        v.check(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        v.check(not self.offload_optimizer or self.zero_stage >= 1, "offload_optimizer",
                "needs zero_stage >= 1")
        v.check(not self.offload_params or self.zero_stage == 3, "offload_params", "needs zero_stage 3")


@dataclass
class TrainConfig:
    global_batch_size: int = 32
    """Samples per optimizer step, over all ranks and accumulation steps."""
    micro_batch_size: int = 4
    """Samples per forward pass on one rank. Accumulation steps are derived:
    global_batch_size / (micro_batch_size * ranks), which must divide exactly."""
    epochs: int = 1
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    eval_every: int = 0
    """Evaluate every N optimizer steps (0: only at the start and the end)."""
    eval_batch_size: int | None = None
    """Per-rank batch size for evaluation; None uses micro_batch_size."""
    log_every: int = 1
    """Write train metrics every N optimizer steps."""

    def validate(self, v: Validator) -> None:
        v.check(self.global_batch_size > 0, "global_batch_size", f"must be > 0, got {self.global_batch_size}")
        v.check(self.micro_batch_size > 0, "micro_batch_size", f"must be > 0, got {self.micro_batch_size}")
        v.check(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        if self.max_steps is not None:
            v.check(self.max_steps > 0, "max_steps", f"must be > 0, got {self.max_steps}")
        v.check(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        v.check(self.log_every > 0, "log_every", f"must be > 0, got {self.log_every}")

    def accumulation_steps(self, world_size: int) -> int:
        return exact_div(self.global_batch_size, self.micro_batch_size * world_size,
                         "train.global_batch_size", "train.micro_batch_size x ranks")


@dataclass
class LoggingConfig:
    tensorboard: bool = False
    """Also write TensorBoard event files to OUTPUT_DIR/tensorboard."""
    progress_bar: bool = True
    """Show a progress bar (main rank only)."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save a resumable checkpoint every N optimizer steps (0: only at the end)."""
    keep_last: int = 2
    """Keep this many most recent checkpoints."""
    resume: str = "auto"
    """`auto` continues from the latest checkpoint in OUTPUT_DIR/checkpoints, `never`
    starts afresh (refusing to overwrite an existing run), or a checkpoint directory."""

    def validate(self, v: Validator) -> None:
        v.check(self.every >= 0, "every", f"must be >= 0, got {self.every}")
        v.check(self.keep_last >= 1, "keep_last", f"must be >= 1, got {self.keep_last}")
        if self.resume not in ("auto", "never"):
            v.check(Path(self.resume).is_dir(), "resume",
                    f"must be auto, never or a checkpoint directory; no directory {self.resume}")


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

    def validate(self, v: Validator) -> None:
        v.sub("tokenizer", self.tokenizer)
        v.sub("train", self.train)
        v.sub("deepspeed", self.deepspeed)
        v.sub("checkpoint", self.checkpoint)
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
        v.check(not self.data.packing, "data.packing", "packing is for SFT only")


@dataclass
class RoleConfig:
    """One of PPO's four models: what to load and how to run it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Used by the trainable roles (policy, value) only."""
    deepspeed: DeepSpeedConfig | None = None
    """This model's ZeRO stage, precision and offload; None uses the stage's `deepspeed`."""


@dataclass
class RolloutConfig:
    batch_size: int = 64
    """Prompts per PPO step, over all ranks (each gets one sampled response)."""
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

    def validate(self, v: Validator) -> None:
        v.check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        if self.micro_batch_size is not None:
            v.check(self.micro_batch_size > 0, "micro_batch_size", f"must be > 0, got {self.micro_batch_size}")
        v.check(self.max_new_tokens > 0, "max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        v.check(0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens",
                f"must be in [0, max_new_tokens], got {self.min_new_tokens}")
        v.check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        v.check(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        v.check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")


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
class PPOConfig(BaseStageConfig):
    """PPO: the policy (from SFT) against a frozen reward model, with a value model
    (from the reward model) and a frozen reference policy for the KL penalty.

    train.global_batch_size is the PPO minibatch (samples per optimizer step);
    rollout.batch_size must be a multiple of it. train.epochs counts passes over the
    prompts; train.max_steps counts PPO steps (rollout batches).
    """

    policy: RoleConfig = field(default_factory=RoleConfig)
    value: RoleConfig = field(default_factory=RoleConfig)
    """Initialised from the reward model by default (set model.path to it)."""
    reward: RoleConfig = field(default_factory=RoleConfig)
    ref_policy: RoleConfig = field(default_factory=RoleConfig)
    """None of model.path/arch: a frozen copy of the policy's starting weights."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOHParams = field(default_factory=PPOHParams)
    data: DataConfig = field(default_factory=lambda: DataConfig(truncation="drop", max_length=1024,
                                                                max_prompt_length=512))
    sample_every: int = 10
    """Write a few (prompt, response, score) samples to samples.jsonl every N steps; 0 never."""

    stage = "ppo"

    def validate(self, v: Validator) -> None:
        super().validate(v)
        for role in ("policy", "value", "reward"):
            v.sub(f"{role}.model", getattr(self, role).model)
        if self.ref_policy.model.path is not None or self.ref_policy.model.arch is not None:
            v.sub("ref_policy.model", self.ref_policy.model)
        for role in ("policy", "value"):
            v.sub(f"{role}.optim", getattr(self, role).optim)
        for role in ("policy", "value", "reward", "ref_policy"):
            ds = getattr(self, role).deepspeed
            if ds is not None:
                v.sub(f"{role}.deepspeed", ds)
        v.sub("rollout", self.rollout)
        v.sub("ppo", self.ppo)
        v.check(self.data.truncation in ("left", "drop"), "data.truncation",
                f"PPO prompts support left (keep the end) or drop, got {self.data.truncation}")
        v.check(self.rollout.batch_size % self.train.global_batch_size == 0, "rollout.batch_size",
                f"{self.rollout.batch_size} must be a multiple of train.global_batch_size "
                f"({self.train.global_batch_size}, the PPO minibatch)")
        for role in ("reward", "ref_policy"):
            v.check(getattr(self, role).model.lora.r == 0, f"{role}.model.lora.r", "frozen models take no LoRA")
        v.check(self.sample_every >= 0, "sample_every", f"must be >= 0, got {self.sample_every}")

    def primary_model(self) -> ModelConfig:
        return self.policy.model

    def role_deepspeed(self, role: str) -> DeepSpeedConfig:
        return getattr(self, role).deepspeed or self.deepspeed


# --------------------------------------------------------------------------- helpers


def exact_div(a: int, b: int, a_name: str, b_name: str) -> int:
    """a / b as an int, or a ConfigError naming both quantities."""
    if b <= 0 or a % b != 0:
        raise ConfigError(f"{a_name} = {a} must be divisible by {b_name} = {b}")
    return a // b


class Validator:
    """Collects the key path and the source of each value, so checks can say
    where a bad value was written."""

    def __init__(self, where: dict[str, str] | None = None, prefix: str = ""):
        self.where = where or {}
        self.prefix = prefix

    def key(self, name: str) -> str:
        return ".".join(p for p in (self.prefix, name) if p)

    def check(self, ok: bool, name: str, message: str) -> None:
        if not ok:
            key = self.key(name)
            raise ConfigError(f"{_locate(self.where, key)}{key}: {message}")

    def sub(self, name: str, obj: Any) -> None:
        if hasattr(obj, "validate"):
            obj.validate(Validator(self.where, self.key(name)))


def _locate(where: dict[str, str], key: str) -> str:
    # The most specific key with a known source: a.b.c, then a.b, then a.
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        src = where.get(".".join(parts[:n]))
        if src:
            return f"{src}: "
    return ""


# --------------------------------------------------------------------------- dict -> dataclass


def from_dict(cls: type, data: Any, where: dict[str, str] | None = None, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, checking keys and types.

    Unknown keys raise with a did-you-mean; values are coerced only where that is
    unambiguous (an int where a float is wanted, "1e-5" where a float is wanted,
    since YAML 1.1 reads that as a string).
    """
    where = where or {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{_locate(where, prefix)}{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in data:
        if k not in fields:
            key = f"{prefix}.{k}" if prefix else str(k)
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"{_locate(where, key)}unknown config key {key!r}{hint}")
    defaults = cls()
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        default = getattr(defaults, name)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            # A stage may change a group's defaults (PPO's data truncates prompts by
            # dropping them); keys given in the file apply on top of those defaults.
            value = _deep_merge(dataclasses.asdict(default), value)
        kwargs[name] = _coerce(hints[name], value, key, where)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, where: dict[str, str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{_locate(where, key)}{key}: expected {expected}, got {value!r}")

    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else bad(" or ".join(_type_name(a) for a in args))
    if origin is Literal:
        if value not in args:
            raise bad("one of " + ", ".join(repr(a) for a in args))
        return value
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, key)
    if origin is list:
        if isinstance(value, str) and args and args[0] in (int, float):
            value = [x.strip() for x in value.split(",")]  # "2,4,4" on a command line
        if not isinstance(value, list):
            raise bad("a list")
        return [_coerce(args[0], x, f"{key}.{i}", where) for i, x in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if tp is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise bad("an integer") from None
            if f.is_integer():
                return int(f)
        raise bad("an integer")
    if tp is float:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad("a number") from None
        raise bad("a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    raise TypeError(f"config field {key} has unsupported type {tp}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- YAML with line numbers


def load_yaml(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """Read a YAML mapping and the `file:line` of every key in it (dotted keys)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    where: dict[str, str] = {}

    def walk(n: Any, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                where[key] = f"{path}:{k.start_mark.line + 1}"
                walk(v, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, f"{prefix}.{i}")

    walk(node, "")
    return data, where


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", parsed value). Values are read as YAML scalars or lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _interpolate(data: Any, root: str) -> Any:
    if isinstance(data, dict):
        return {k: _interpolate(v, root) for k, v in data.items()}
    if isinstance(data, list):
        return [_interpolate(v, root) for v in data]
    if isinstance(data, str):
        return data.replace("${output_dir}", root)
    return data


def is_multi_stage(data: dict[str, Any]) -> bool:
    return any(s in data for s in STAGES)


def resolve_stage_dict(
    data: dict[str, Any], where: dict[str, str], stage: str, overrides: list[str] = (), source: str = "config"
) -> tuple[dict[str, Any], dict[str, str]]:
    """The plain dict for one stage of a (multi- or single-stage) config, with overrides.

    Returns the dict and the provenance map re-keyed to the stage's own keys.
    """
    data = dict(data)
    if is_multi_stage(data):
        if stage not in data:
            raise ConfigError(f"{source} has no `{stage}:` section (it has: "
                              f"{', '.join(s for s in STAGES if s in data)})")
        root = str(data.get("output_dir", "runs/default"))
        shared = {k: v for k, v in data.items() if k not in STAGES and k != "pipeline"}
        section = data[stage] or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{where.get(stage, source)}: `{stage}:` must be a mapping")
        merged = _deep_merge(shared, section)
        if "output_dir" not in section:
            merged["output_dir"] = f"{root}/{stage}"
        stage_where = {}
        for k, src in where.items():
            head, _, rest = k.partition(".")
            if head == stage and rest:
                stage_where[rest] = src
            elif head not in STAGES and k not in stage_where:
                stage_where[k] = src
    else:
        root = str(data.get("output_dir", "runs/default"))
        merged, stage_where = data, dict(where)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(merged, key, value)
        stage_where[key] = f"command-line override {text!r}"
    # interpolation happens after overrides so that `${output_dir}` in an override works too
    return _interpolate(merged, root), stage_where


def load_stage_config(cls: type, path: str | os.PathLike | None, overrides: list[str] = (),
                      world_size: int | None = None) -> BaseStageConfig:
    """Load, override and validate the config of one stage.

    Args:
        cls: SFTConfig, RMConfig or PPOConfig.
        path: YAML file (single- or multi-stage); None starts from the defaults.
        overrides: `key.sub=value` strings, relative to the stage's section.
        world_size: number of ranks, when known, to check that batch sizes divide.
    """
    data, where = load_yaml(path) if path is not None else ({}, {})
    stage_dict, stage_where = resolve_stage_dict(data, where, cls.stage, overrides, str(path))
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
        if isinstance(cfg, PPOConfig):
            exact_div(cfg.rollout.batch_size, world_size, "rollout.batch_size", "ranks")
    except ConfigError as e:
        raise ConfigError(f"{_locate(where or {}, 'train.global_batch_size')}{e} "
                          f"(ranks = {world_size})") from None


def dump(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
