"""The config groups every stage shares: model, tokenizer, data, optimizer, DeepSpeed,
training loop, logging, checkpoints. Help text lives once, under each field."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rlhf.config.loading import Validator, exact_div


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
    """A Hugging Face model directory, a hub name, or a GGUF file (`*.gguf`, converted once
    per machine to an fp32 HF directory under $RLHF_CACHE/models) to load weights from."""
    gguf_file: str | None = None
    """A GGUF file inside `path` (a directory or hub repo), as `from_pretrained(path,
    gguf_file=...)` takes it; None when `path` is a HF directory or a .gguf file itself."""
    arch: dict[str, Any] | None = None
    """Build a randomly initialised model from this HF config instead of loading one,
    e.g. {model_type: llama, hidden_size: 64, num_hidden_layers: 2}. Exclusive with `path`."""
    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint to run. Off unless you trust it."""
    attn_implementation: str | None = "auto"
    """HF attention backend (sdpa, eager, flash_attention_2, ...). `auto`: FlashAttention-2
    on CUDA in bf16/fp16 when the flash_attn package is installed and the family
    supports it, else transformers' choice (sdpa where the family has it); None: always
    transformers' choice. The RM's shared-prefix layout needs sdpa or eager (`auto`
    picks sdpa there)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    dropout: float | None = None
    """Set every dropout probability in the model config to this; None keeps the model's own."""
    logits_chunk_mib: float = 256
    """Causal LMs: log-probabilities and losses run the LM head over chunks of positions
    whose float32 logits take at most this many MiB (forward and backward), instead of
    materialising all `(batch, tokens, vocabulary)` logits; the same numbers up to
    rounding. 0 computes all logits at once, as does ZeRO-3 when LoRA adapts the output
    layer (rlhf.lm_head.chunked_head). See rlhf/lm_head.py."""
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self, v: Validator) -> None:
        v.check(self.path is not None or self.arch is not None, "path",
                "set model.path (a HF model directory or hub name) or model.arch (a config to build from)")
        v.check(self.path is None or self.arch is None, "arch", "set model.path or model.arch, not both")
        v.check(self.gguf_file is None or self.path is not None, "gguf_file",
                "needs model.path: the directory or hub repo that holds the GGUF file")
        if self.arch is not None:
            v.check("model_type" in self.arch, "arch", "needs a model_type, e.g. llama, gpt2, opt")
        if self.dropout is not None:
            v.check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        v.check(self.logits_chunk_mib >= 0, "logits_chunk_mib", f"must be >= 0, got {self.logits_chunk_mib}")
        v.sub("lora", self.lora)


@dataclass
class TokenizerConfig:
    path: str | None = None
    """Tokenizer directory or hub name; None uses model.path."""
    pad_token: str = "auto"
    """The pad token, which must differ from every token that ends a response (masks are
    built from positions; a pad equal to EOS would hide every generated EOS). `auto`
    keeps the tokenizer's own pad when it is not an end token, else reuses an unused
    special token the vocabulary has (`<|finetune_right_pad_id|>`, `<|pad|>`, `<pad>`,
    `[PAD]`, `<|padding|>`, `<|endoftext|>`, then the unk token), else adds `<|pad|>`
    (the embeddings grow by one row). A token string: reused when the vocabulary has it,
    added when it does not. The choice is printed at start."""
    stop_tokens: list[str] = field(default_factory=list)
    """Tokens that end a response besides the ones found automatically: the tokenizer's
    EOS, the chat template's end-of-turn token and the model's generation_config
    eos_token_id list."""
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
    padding_free: bool | None = None
    """SFT: lay each micro-batch's samples end to end in one row, with position ids that
    restart at every sample and no padding at all; with FlashAttention-2 the model runs
    them as variable-length sequences (no attention across samples). The same loss as
    padded rows. None turns it on where it pays: when the model runs FlashAttention-2
    and its family keeps samples apart by position ids (PADDING_FREE_MODEL_TYPES in
    rlhf/trainers/sft.py). With sdpa or eager it works too, but then transformers builds
    a (tokens x tokens) mask over the row, which costs more than the padding it saves."""
    packing: bool = False
    """Pack several samples into each sequence; attention never crosses samples. SFT:
    samples joined up to max_length. RM (with reward.shared_prefix): each micro-batch's
    pairs placed side by side in rows as wide as its longest pair."""
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
    zero_hpz_partition_size: int = 1
    """ZeRO++ hierarchical partitioning (zero_stage 3, several nodes): each rank also
    keeps a secondary shard of the parameters partitioned over groups of this many GPUs
    (set it to the GPUs per node), so that the forward and backward gathers stay inside
    a node and only the first gather of a step crosses nodes; costs one more copy of
    the parameters divided by this number. 1 turns it off. Must divide the ranks."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Merged last into the generated DeepSpeed JSON, for settings not named here
    (e.g. {zero_optimization: {reduce_bucket_size: 5e8}})."""

    def validate(self, v: Validator) -> None:
        v.check(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        v.check(not self.offload_optimizer or self.zero_stage >= 1, "offload_optimizer",
                "needs zero_stage >= 1")
        v.check(not self.offload_params or self.zero_stage == 3, "offload_params", "needs zero_stage 3")
        v.check(self.zero_hpz_partition_size >= 1, "zero_hpz_partition_size",
                f"must be >= 1, got {self.zero_hpz_partition_size}")
        v.check(self.zero_hpz_partition_size == 1 or self.zero_stage == 3, "zero_hpz_partition_size",
                "hierarchical partitioning needs zero_stage 3")

    def validate_trainable(self, v: Validator) -> None:
        """Checks for an engine that trains (frozen models may run bf16 without ZeRO)."""
        v.check(not (self.precision in ("bf16", "fp16") and self.zero_stage == 0), "zero_stage",
                f"{self.precision} training needs zero_stage >= 1: DeepSpeed keeps fp32 master weights only "
                "in its ZeRO optimizers (ZeRO-1 on one rank costs nothing extra)")


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
    micro_batch_tokens: int | None = None
    """On-policy stages only: form the update's micro-batches, and the chunks of the
    scoring passes (reference, values, reward model), by tokens instead of rows: as many
    whole groups (with rollout.shared_prefix; else rows) as fit this many tokens as the
    model runs them (rows x the widest row). Short responses then make fewer, fuller
    micro-batches (less per-call overhead, larger matrix products); long ones more,
    so that activations stay bounded. Every rank runs the same number (the largest any
    rank needs), and the optimizer still steps once per global_batch_size rows: the
    gradients equal those of fixed micro-batches up to rounding. A group wider than the
    budget runs alone. None: micro_batch_size rows (and eval_batch_size for the passes)."""
    log_every: int = 1
    """Write train metrics every N optimizer steps."""
    collective_timeout_minutes: float = 30.0
    """How long a rank waits in a collective (all-reduce, barrier, a ZeRO gather) for
    the others. A rank that died or stalls then ends the rest with an error naming it,
    instead of leaving them waiting forever; keep it above the longest work one rank
    does alone while the others wait (e.g. tokenizing the dataset the first time)."""

    def validate(self, v: Validator) -> None:
        v.check(self.global_batch_size > 0, "global_batch_size", f"must be > 0, got {self.global_batch_size}")
        v.check(self.micro_batch_size > 0, "micro_batch_size", f"must be > 0, got {self.micro_batch_size}")
        v.check(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        if self.max_steps is not None:
            v.check(self.max_steps > 0, "max_steps", f"must be > 0, got {self.max_steps}")
        v.check(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        if self.micro_batch_tokens is not None:
            v.check(self.micro_batch_tokens > 0, "micro_batch_tokens", f"must be > 0, got {self.micro_batch_tokens}")
        v.check(self.log_every > 0, "log_every", f"must be > 0, got {self.log_every}")
        v.check(self.collective_timeout_minutes > 0, "collective_timeout_minutes",
                f"must be > 0, got {self.collective_timeout_minutes}")

    def accumulation_steps(self, world_size: int) -> int:
        return exact_div(self.global_batch_size, self.micro_batch_size * world_size,
                         "train.global_batch_size", "train.micro_batch_size x ranks")


@dataclass
class WandbConfig:
    project: str | None = None
    """Weights & Biases project to log to; None turns W&B logging off."""
    name: str | None = None
    """Run name; None: the output directory's name, e.g. `sft`."""
    entity: str | None = None
    """W&B entity (user or team); None: your default."""
    group: str | None = None
    """Group runs together (e.g. the stages of one pipeline)."""
    tags: list[str] = field(default_factory=list)
    """Tags of the run."""
    mode: Literal["online", "offline"] = "online"
    """`offline` writes the run under OUTPUT_DIR/wandb with no network (upload it later
    with `wandb sync`)."""


@dataclass
class LoggingConfig:
    tensorboard: bool = False
    """Also write TensorBoard event files to OUTPUT_DIR/tensorboard."""
    progress_bar: bool = True
    """Show a progress bar (main rank only)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Also log every metric to Weights & Biases (main rank only); a resumed stage
    continues the same W&B run."""

    def validate(self, v: Validator) -> None:
        if self.wandb.project is not None:
            import importlib.util

            v.check(importlib.util.find_spec("wandb") is not None, "wandb.project",
                    "W&B logging needs the wandb package: pip install wandb")


@dataclass
class CheckpointConfig:
    every_minutes: float = 30.0
    """Save a resumable checkpoint when this many minutes have passed since the last
    one (rank 0's clock decides for all ranks); 0 turns it off. Besides `every`, and
    besides the checkpoint written on SIGTERM or SIGUSR1 (then the run exits with code 75)."""
    every: int = 0
    """Also save one every N optimizer steps (0: by time only, and at the end)."""
    keep_last: int = 2
    """Keep this many most recent checkpoints (one more exists while the next is written)."""
    resume: str = "auto"
    """`auto` continues from the latest checkpoint in OUTPUT_DIR/checkpoints, `never`
    starts afresh (refusing to overwrite an existing run), or a checkpoint directory."""

    def validate(self, v: Validator) -> None:
        v.check(self.every_minutes >= 0, "every_minutes", f"must be >= 0, got {self.every_minutes}")
        v.check(self.every >= 0, "every", f"must be >= 0, got {self.every}")
        v.check(self.keep_last >= 1, "keep_last", f"must be >= 1, got {self.keep_last}")
        if self.resume not in ("auto", "never"):
            v.check(Path(self.resume).is_dir(), "resume",
                    f"must be auto, never or a checkpoint directory; no directory {self.resume}")


