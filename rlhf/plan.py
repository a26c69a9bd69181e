"""`rlhf plan CONFIG`: the memory each stage will need on every GPU, before launch.

For each stage of a config (SFT, RM, PPO), per GPU:

- model states (weights, gradients, Adam): DeepSpeed's own estimators where they
  apply (ZeRO-2/3, mixed precision, every weight trained), otherwise the same
  arithmetic term by term (`model_states`): fp32 or 16-bit weights, DeepSpeed's fp32
  master weights, gradients and Adam moments, each divided over the ranks that
  ZeRO's stage shards it over, and the gathered layer of ZeRO-3;
- the forward and backward of one micro-batch, measured by running the model's own
  code on fake tensors (shapes, no data; rlhf/memory.py) at full-length rows, as
  configured and with gradient checkpointing toggled, and the share of the LM head's
  logits (in `model.logits_chunk_mib` chunks, and what all logits at once would take);
- PPO's other phases: generation (the prompts' prefill and the KV cache of prompt +
  response tokens, the sampling temporaries per step, and under ZeRO-3 the gathered
  copy of the policy), the scoring passes of the four models, the value update, and
  the experience kept between phases.

Model shapes come from `model.arch` or the model's config.json, never its weights; a
pipeline stage that starts from an earlier stage's output takes that stage's model.
Numbers are for rows of `data.max_length` tokens (PPO: prompt and response at their
maximum lengths); real batches are usually shorter. `--device cpu` plans the CPU's
attention kernels instead of a GPU's fused ones; benchmarks/plan_vs_measured.py
compares such plans with measured steps. On a GPU, leave about a tenth free for the
CUDA context, communication buffers and allocator fragmentation, which the plan does
not count.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhf.config import (BaseStageConfig, ConfigError, DeepSpeedConfig, ModelConfig, PPOConfig, RMConfig,
                         SFTConfig, from_dict, is_multi_stage, load_yaml, parse_override, resolve_stage_dict,
                         set_dotted, validate)
from rlhf.memory import TensorMemory, fake_tensors, register_fused_attention
from rlhf.model_source import gguf_location

GB = 1e9
PLANNED = ("sft", "rm", "ppo")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HEADROOM = 0.9
"""Share of GPU memory a plan may fill before it is called tight (see the module docstring)."""


@dataclass
class World:
    gpus_per_node: int = 1
    nodes: int = 1
    device: str = "cuda"

    @property
    def ranks(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass
class Part:
    name: str
    bytes: float
    note: str = ""


@dataclass
class StagePlan:
    stage: str
    header: list[str]
    parts: list[Part] = field(default_factory=list)
    peak: float = 0.0


# --------------------------------------------------------------------------- configs and model shapes


def load_configs(path: str, overrides: list[str], stages: list[str] | None, world: World) -> dict[str, Any]:
    """The validated config of each stage to plan. A multi-stage file gives every stage
    it has a section for (overrides as `rlhf pipeline` takes them); a single-stage file
    needs `stages` to say which stage it is."""
    from rlhf.pipeline import chain_defaults
    from rlhf.stages import STAGES, config_class

    data, where = load_yaml(path)
    multi = is_multi_stage(data)
    if multi:
        for text in overrides:
            key, value = parse_override(text)
            set_dotted(data, key, value)
            where[key] = f"command-line override {text!r}"
        chain_defaults(data, str(data.get("output_dir", "runs/default")))
        if not stages:
            stages = [s for s in PLANNED if s in data]
            skipped = [s for s in STAGES if s in data and s not in PLANNED]
            if skipped:
                print(f"[plan] not planned: {', '.join(skipped)} (rlhf plan covers {', '.join(PLANNED)})")
    elif not stages:
        raise ConfigError(f"{path} is a single-stage config: name its stage with --stages sft, rm or ppo")
    unknown = [s for s in stages if s not in PLANNED]
    if unknown:
        raise ConfigError(f"--stages: cannot plan {unknown[0]!r} (choose from {', '.join(PLANNED)})")
    cfgs = {}
    for stage in stages:
        stage_dict, stage_where = resolve_stage_dict(data, where, stage, () if multi else overrides, path)
        cfg = from_dict(config_class(stage), stage_dict, stage_where)
        validate(cfg, stage_where, world.ranks)
        cfgs[stage] = cfg
    return cfgs


def stage_outputs(cfgs: dict[str, BaseStageConfig]) -> dict[Path, ModelConfig]:
    """Where each stage's model will be written, and the model config it is made from."""
    out = {}
    for stage, cfg in cfgs.items():
        model = cfg.policy.model if isinstance(cfg, PPOConfig) else cfg.model
        out[(Path(cfg.output_dir) / "final").resolve()] = model
        if isinstance(cfg, PPOConfig):
            out[(Path(cfg.output_dir) / "final" / "value").resolve()] = cfg.value.model
    return out


def hf_config(cfg: BaseStageConfig, model: ModelConfig, outputs: dict[Path, ModelConfig], key: str):
    """The Hugging Face config of a model: from `arch`, from config.json at `path`, or,
    for a path an earlier stage of this pipeline will write, from that stage's model;
    with the vocabulary the tokenizer will give it."""
    from transformers import AutoConfig

    for _ in range(len(outputs) + 1):
        if model.arch is not None or model.path is None:
            break
        if (Path(model.path) / "config.json").exists() or not Path(model.path).resolve() in outputs:
            break
        model = outputs[Path(model.path).resolve()]
    if model.arch is not None:
        arch = dict(model.arch)
        config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        vocab = vocabulary(cfg, model.arch.get("vocab_size"))
        if vocab is None:
            raise ConfigError(f"{key}.arch: no vocabulary size: the tokenizer (tokenizer.path) is not there yet "
                              "and the arch names no vocab_size")
        config.vocab_size = vocab
        return config
    gguf = gguf_location(model)
    try:
        if gguf is not None:  # its metadata, without converting the weights
            config = AutoConfig.from_pretrained(gguf[0], gguf_file=gguf[1])
        else:
            config = AutoConfig.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}.path: cannot read the model's config.json at {model.path!r}: {e}") from None
    config.vocab_size = max(config.vocab_size, vocabulary(cfg, config.vocab_size) or 0)
    return config


def vocabulary(cfg: BaseStageConfig, fallback: int | None) -> int | None:
    """The tokenizer's size (with the pad token the loader adds) when it is on this
    machine; else the built-in task's vocabulary, else `fallback`; a hub name is looked
    up last (that can take a minute without a network)."""
    from rlhf.models import load_tokenizer

    path = cfg.tokenizer.path or cfg.primary_model().path
    if path is not None and Path(path).is_dir():
        return len(load_tokenizer(cfg.tokenizer, cfg.primary_model()))
    if cfg.task is not None:
        return cfg.task.vocab_size
    if fallback is not None or path is None:
        return fallback
    try:
        return len(load_tokenizer(cfg.tokenizer, cfg.primary_model()))
    except ValueError:
        return None


# --------------------------------------------------------------------------- model states


def model_states(params: int, trainable: int, largest: int, ds: DeepSpeedConfig, train: bool, world: World,
                 ) -> tuple[float, str, bool]:
    """Bytes per GPU of a model's weights, gradients and optimizer states, a note naming
    the source, and whether the step's own (fake) run counts the 16-bit/fp32 gradients
    (ZeRO-0/1 keep them whole until the step; ZeRO-2/3 reduce them into shards).

    Per trained parameter, divided by the ranks N where ZeRO shards it: fp32 weights 4
    (/N at ZeRO-3), gradients 4 (/N from ZeRO-2), Adam 8 (/N from ZeRO-1). Mixed
    precision (DeepSpeed): 16-bit weights 2, 16-bit gradients 2, fp32 gradients 4 (whole
    in ZeRO-1's bf16 optimizer, which accumulates in fp32), fp32 master weights 4 and
    Adam 8; ZeRO-3 also holds the largest layer gathered (4 bytes per parameter: its
    weights and gradients). Offloaded optimizer states live on the CPU.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n = world.ranks
    stage = ds.zero_stage if train or ds.zero_stage == 3 else 0
    wbytes = 4 if ds.precision == "fp32" else 2
    weights = wbytes * params / (n if stage == 3 else 1)
    if not train:
        return weights, f"{ds.precision} weights" + (" (ZeRO-3 shard)" if stage == 3 else ""), False
    gathered = 4 * largest if stage == 3 else 0
    if ds.precision != "fp32" and stage in (2, 3) and trainable == params:
        if stage == 2:
            _, gpu = estimate_zero2_model_states_mem_needs(params, world.gpus_per_node, world.nodes,
                                                           cpu_offload=ds.offload_optimizer)
        else:
            _, gpu, _ = estimate_zero3_model_states_mem_needs(params, largest, world.gpus_per_node, world.nodes,
                                                              cpu_offload=ds.offload_optimizer,
                                                              cpu_offload_params=ds.offload_params)
        return float(gpu), f"DeepSpeed's ZeRO-{stage} estimator", False
    shard_grads = stage >= 2
    opt = 0 if ds.offload_optimizer else (8 if ds.precision == "fp32" else 12) * trainable / (n if stage >= 1 else 1)
    grads = 0.0
    if shard_grads:
        grads = (4 if ds.precision == "fp32" else 2) * trainable / n
    if ds.precision != "fp32" and not ds.offload_optimizer:
        grads += 4 * trainable / (n if stage >= 2 or ds.precision == "fp16" else 1)  # fp32 gradients
    if ds.offload_params and stage == 3:
        weights = 0.0
    what = "weights, gradients, Adam" + (" (optimizer on the CPU)" if ds.offload_optimizer else "")
    return weights + opt + grads + gathered, f"ZeRO-{stage} {ds.precision}: {what}", not shard_grads


# --------------------------------------------------------------------------- fake-tensor runs


@dataclass
class FakeModel:
    """A model built on fake tensors, for measuring its steps."""

    module: torch.nn.Module
    params: int
    trainable: int
    largest: int
    config: Any


def build_fake(config, causal: bool, model_cfg: ModelConfig, dtype: torch.dtype, world: World,
               gradient_checkpointing: bool, custom_mask: bool = False) -> FakeModel:
    """Call inside `fake_tensors()`. On CUDA attention is counted as a fused kernel keeps
    it, except for models that take a custom mask (sdpa, as they run)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf.models import ScalarModel

    config = copy.deepcopy(config)
    if custom_mask:
        config._attn_implementation = "sdpa"
    elif world.device == "cuda":
        config._attn_implementation = register_fused_attention()
    elif model_cfg.attn_implementation not in (None, "auto"):
        config._attn_implementation = model_cfg.attn_implementation
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    if not causal:
        config.num_labels = 1
    if model_cfg.lora.r:
        model = fake_lora_model(auto, config, dtype, model_cfg.lora, "CAUSAL_LM" if causal else "SEQ_CLS")
    else:
        model = auto.from_config(config, dtype=dtype)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not causal:
        model = ScalarModel(model)
    model.train()
    unique = {id(p): p for p in model.parameters()}.values()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return FakeModel(model, sum(p.numel() for p in unique), sum(p.numel() for p in unique if p.requires_grad),
                     largest, config)


def fake_lora_model(auto, config, dtype: torch.dtype, lora, task_type: str):
    """A model with LoRA adapters for a fake-tensor run (call inside `fake_tensors()`).
    PEFT moves each new adapter onto its base layer's device and dtype with `Module.to`,
    which cannot swap fake parameters; so model and adapters are built on the meta
    device, outside the fake mode, and then given (fake) storage."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from rlhf.models import apply_lora

    with unset_fake_temporarily(), torch.device("meta"):
        model = apply_lora(auto.from_config(config, dtype=dtype), lora, task_type)
    model = model.to_empty(device="cpu")
    model.get_base_model().tie_weights()  # to_empty gave each module its own copy of a tied weight
    return model


def peak_bytes(fn) -> int:
    """Peak tensor bytes that `fn()` creates (on fake tensors: would create)."""
    mem = TensorMemory("cpu")
    with mem:
        fn()
    return mem.peak


def train_peak(model: FakeModel, loss_fn, drop_grads: bool) -> int:
    """Peak of one forward and backward; with `drop_grads` each gradient is freed as soon
    as it is complete (ZeRO-2/3 reduce them into shards counted in the model states)."""
    hooks = []
    if drop_grads:
        hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
                 for p in model.module.parameters() if p.requires_grad]

    def step():
        loss_fn().backward()

    try:
        return peak_bytes(step)
    finally:
        for h in hooks:
            h.remove()
        model.module.zero_grad(set_to_none=True)


def chunk_mib(model: FakeModel, model_cfg: ModelConfig, ds: DeepSpeedConfig) -> float:
    """The LM head's chunks as the run takes them (rlhf.lm_head.chunked_head): none under
    ZeRO-3 when the output layer is not a plain linear layer (LoRA adapts it), read off
    the built model as the run does."""
    from rlhf.models import unwrap

    head = unwrap(model.module).get_output_embeddings()
    if ds.zero_stage == 3 and head is not None and type(head) is not torch.nn.Linear:
        return 0
    return model_cfg.logits_chunk_mib


def causal_loss(model: FakeModel, rows: int, width: int, first: int, chunk_mib: float, temperature: float = 1.0,
                entropy_grad: bool = False, with_entropy: bool = False):
    from rlhf.lm_head import causal_logprobs

    def loss():
        ids = torch.zeros(rows, width, dtype=torch.long)
        lp, ent = causal_logprobs(model.module, ids, None, None, first, None, temperature, with_entropy,
                                  entropy_grad, chunk_mib)
        return lp.sum() + (ent.sum() if entropy_grad else 0)

    return loss


def hidden_only_loss(model: FakeModel, rows: int, width: int, first: int):
    """The forward up to the LM head's input (the LM head computing nothing)."""
    from rlhf.lm_head import final_hidden_states

    def loss():
        ids = torch.zeros(rows, width, dtype=torch.long)
        hidden, _ = final_hidden_states(model.module, input_ids=ids, use_cache=False, logits_to_keep=width - first + 1)
        return hidden.float().sum()

    return loss


def scalar_loss(model: FakeModel, rows: int, width: int, pairs_mask: bool = False):
    """Scores of every position; with `pairs_mask` through a boolean `(B, 1, T, T)` mask
    and position ids, as the reward model's shared-prefix layout calls it."""

    def loss():
        ids = torch.zeros(rows, width, dtype=torch.long)
        if pairs_mask:
            allowed = torch.ones(rows, 1, width, width, dtype=torch.bool)
            return model.module(ids, allowed, torch.zeros(rows, width, dtype=torch.long)).sum()
        return model.module(ids, torch.ones(rows, width, dtype=torch.long)).sum()

    return loss


# --------------------------------------------------------------------------- stages


class Planner:
    def __init__(self, cfgs: dict[str, BaseStageConfig], world: World):
        self.cfgs = cfgs
        self.world = world
        self.outputs = stage_outputs(cfgs)

    def config_of(self, cfg: BaseStageConfig, model: ModelConfig, key: str):
        return hf_config(cfg, model, self.outputs, key)

    def plan(self, stage: str) -> StagePlan:
        return {"sft": self.plan_sft, "rm": self.plan_rm, "ppo": self.plan_ppo}[stage](self.cfgs[stage])

    def accumulation(self, cfg: BaseStageConfig) -> int:
        return cfg.train.accumulation_steps(self.world.ranks)

    def describe(self, model: FakeModel, name: str, ds: DeepSpeedConfig) -> str:
        lora = f", {model.trainable / 1e6:,.1f}M trained (LoRA)" if model.trainable < model.params else ""
        return (f"{name}: {model.config.model_type}, {model.params / 1e6:,.1f}M parameters{lora}, vocabulary "
                f"{model.config.vocab_size:,}; ZeRO-{ds.zero_stage} {ds.precision} on {self.world.ranks} "
                f"{'GPU' if self.world.device == 'cuda' else 'rank'}(s)")

    def trained_step(self, plan: StagePlan, model: FakeModel, model_cfg: ModelConfig, ds: DeepSpeedConfig,
                     accumulation: int, build, loss_fns) -> None:
        """Model states and one micro-batch's forward and backward, as configured; the
        alternative gradient checkpointing in the note; the logits' share for LMs.
        `loss_fns(model)` gives the configured loss, and for LMs (full logits, hidden only).
        With gradient accumulation and whole gradients (ZeRO-0/1), a micro-batch after the
        first runs its backward over the gradients held since the first: they count in full,
        the new ones only until they are added in."""
        states, note, grads_in_run = model_states(model.params, model.trainable, model.largest, ds, True,
                                                  self.world)
        plan.parts.append(Part("model states", states, note))
        held = model.trainable * (4 if ds.precision == "fp32" else 2) if grads_in_run and accumulation > 1 else 0
        if held:
            plan.parts.append(Part("gradients held between micro-batches", held, f"{accumulation} accumulated"))
        configured, *lm = loss_fns(model)

        def peak(m, fn):
            return train_peak(m, fn, drop_grads=held > 0 or not grads_in_run)

        step = peak(model, configured)
        other = build(not model_cfg.gradient_checkpointing)
        step_other = peak(other, loss_fns(other)[0])
        gc = "on" if model_cfg.gradient_checkpointing else "off"
        plan.parts.append(Part(f"forward + backward (checkpointing {gc})", step,
                               f"checkpointing {'off' if gc == 'on' else 'on'}: {fmt(step_other)}"))
        if lm:
            full, hidden = (peak(model, fn) for fn in lm)
            chunks = chunk_mib(model, model_cfg, ds)
            chunk = f"{chunks:g} MiB chunks" if chunks else "all at once"
            plan.parts.append(Part(f"  of which logits ({chunk})", max(step - hidden, 0),
                                   f"all at once: {fmt(max(full - hidden, 0))}"))
        plan.peak = states + held + step

    def plan_sft(self, cfg: SFTConfig) -> StagePlan:
        rows, width = cfg.train.micro_batch_size, cfg.data.max_length
        plan = StagePlan("sft", [])
        dtype = DTYPES[cfg.deepspeed.precision]
        config = self.config_of(cfg, cfg.model, "model")
        with fake_tensors():
            def build(gc):
                return build_fake(config, True, cfg.model, dtype, self.world, gc)

            model = build(cfg.model.gradient_checkpointing)
            plan.header = [self.describe(model, "policy", cfg.deepspeed),
                           f"micro-batch {rows} x {width} tokens, every position a target"]
            self.trained_step(plan, model, cfg.model, cfg.deepspeed, self.accumulation(cfg), build, lambda m: (
                causal_loss(m, rows, width, 1, chunk_mib(m, cfg.model, cfg.deepspeed)),
                causal_loss(m, rows, width, 1, 0), hidden_only_loss(m, rows, width, 1)))
        return plan

    def plan_rm(self, cfg: RMConfig) -> StagePlan:
        # Separate rows: chosen and rejected each a row. Shared prefix: a pair per row,
        # at worst (nothing shared) both sequences side by side, with a 4D mask.
        micro, shared = cfg.train.micro_batch_size, cfg.reward.shared_prefix
        rows, width = (micro, 2 * cfg.data.max_length) if shared else (2 * micro, cfg.data.max_length)
        plan = StagePlan("rm", [])
        dtype = DTYPES[cfg.deepspeed.precision]
        config = self.config_of(cfg, cfg.model, "model")
        with fake_tensors():
            def build(gc):
                return build_fake(config, False, cfg.model, dtype, self.world, gc, custom_mask=shared)

            model = build(cfg.model.gradient_checkpointing)
            layout = "shared-prefix rows, nothing shared" if shared else "separate rows"
            plan.header = [self.describe(model, "reward model", cfg.deepspeed),
                           f"micro-batch {micro} pairs: {rows} rows x {width} tokens ({layout})"]
            self.trained_step(plan, model, cfg.model, cfg.deepspeed, self.accumulation(cfg), build,
                              lambda m: (scalar_loss(m, rows, width, pairs_mask=shared),))
        return plan

    def plan_ppo(self, cfg: PPOConfig) -> StagePlan:
        w, r = self.world, cfg.rollout
        P = cfg.data.max_prompt_length or cfg.data.max_length - r.max_new_tokens
        R = r.max_new_tokens
        T = P + R
        per_rank = r.batch_size // w.ranks
        gen_rows = min(r.micro_batch_size or per_rank, per_rank)
        micro = cfg.train.micro_batch_size
        score_rows = cfg.train.eval_batch_size or micro
        budget = cfg.train.micro_batch_tokens
        if budget is not None:  # as many full-width rows as the budget holds (a wider group runs alone)
            group = r.n if r.shared_prefix and r.n > 1 else 1
            micro = score_rows = max(budget, P + group * R) // T
        plan = StagePlan("ppo", [])
        roles = {}
        totals = {}
        with fake_tensors():
            for role, causal in (("policy", True), ("value", False), ("ref_policy", True), ("reward", False)):
                model_cfg = self.role_model(cfg, role)
                ds = cfg.role_deepspeed(role)
                config = self.config_of(cfg, model_cfg, f"{role}.model")
                roles[role] = (build_fake(config, causal, model_cfg, DTYPES[ds.precision], w,
                                          model_cfg.gradient_checkpointing), model_cfg, ds)
            policy, policy_cfg, policy_ds = roles["policy"]
            plan.header = [self.describe(m, role, ds) for role, (m, _, ds) in roles.items()]
            plan.header.append(f"rollouts: {per_rank} prompts per rank, generated {gen_rows} at a time, "
                               f"{P} prompt + {R} response tokens; updates: micro-batch {micro}"
                               + (f" (train.micro_batch_tokens {budget})" if budget is not None else ""))
            states = 0.0
            grads_in_run = {}
            for role, (m, _, ds) in roles.items():
                s, note, grads_in_run[role] = model_states(m.params, m.trainable, m.largest, ds,
                                                           role in ("policy", "value"), w)
                plan.parts.append(Part(f"{role} model states", s, note))
                states += s
            experience = per_rank * (16 * P + 56 * R)
            plan.parts.append(Part("experience (ids, masks, log-probs, values, advantages)", experience))

            # generation: prefill of the prompts with the KV cache kept, then the cache of
            # every response token and one step's logits through the sampler
            mem = TensorMemory("cpu")
            with torch.no_grad(), mem:
                out = policy.module(input_ids=torch.zeros(gen_rows, P, dtype=torch.long), use_cache=True,
                                    logits_to_keep=1)
                prefill_cache = mem.current
                del out
            cache = prefill_cache * T / P
            sampling = gen_rows * policy.config.vocab_size * 32  # float32 logits and copies, float64 CDF
            gathered = policy.params * (4 if policy_ds.precision == "fp32" else 2) if policy_ds.zero_stage == 3 else 0
            totals["generation"] = max(mem.peak, cache + sampling) + gathered
            plan.parts.append(Part("generation", totals["generation"],
                                   f"KV cache {fmt(cache)}" + (f", gathered policy {fmt(gathered)}" if gathered
                                                               else "")))
            # scoring: one no-grad pass of each model over a chunk of rollouts
            # (under ZeRO-3 with each model's weights gathered for all its chunks at once)
            score = []
            with torch.no_grad():
                for role, (m, mcfg, ds) in roles.items():
                    if role == "policy" and r.logprobs_from_generation:
                        continue
                    if role in ("policy", "ref_policy"):
                        peak = peak_bytes(causal_loss(m, score_rows, T, P, chunk_mib(m, mcfg, ds), r.temperature))
                    else:
                        peak = peak_bytes(scalar_loss(m, score_rows, T))
                    score.append(peak + (m.params * (4 if ds.precision == "fp32" else 2) if ds.zero_stage == 3
                                         else 0))
            totals["scoring"] = max(score)
            plan.parts.append(Part("scoring passes", totals["scoring"], f"{score_rows} rollouts at a time"))
            # updates: the policy's, then the value model's, one micro-batch each; with
            # gradient accumulation both models' unsharded gradients are held between
            # micro-batches (a backward adds its new gradients into its own, as in trained_step)
            accumulation = self.accumulation(cfg)
            held = {role: roles[role][0].trainable * (4 if roles[role][2].precision == "fp32" else 2)
                    if grads_in_run[role] and accumulation > 1 else 0 for role in ("policy", "value")}
            value = roles["value"][0]
            losses = {"policy": causal_loss(policy, micro, T, P, chunk_mib(policy, policy_cfg, roles["policy"][2]),
                                            r.temperature,
                                            cfg.ppo.entropy_coef > 0, True),
                      "value": scalar_loss(value, micro, T)}
            for role, other in (("policy", "value"), ("value", "policy")):
                name = f"{role} update"
                totals[name] = held[role] + held[other] + train_peak(
                    roles[role][0], losses[role], held[role] > 0 or not grads_in_run[role])
                plan.parts.append(Part(name, totals[name], "forward + backward" + (
                    f", gradients held {fmt(held[role] + held[other])}" if held[role] + held[other] else "")))
        phase = max(totals, key=totals.get)
        plan.peak = states + experience + totals[phase]
        plan.header.append(f"the largest phase: {phase}" + ("; ppo.ptx is not counted" if cfg.ppo.ptx.coef else ""))
        return plan

    @staticmethod
    def role_model(cfg: PPOConfig, role: str) -> ModelConfig:
        m = getattr(cfg, role).model
        if role == "ref_policy" and m.path is None and m.arch is None:
            m = dataclasses.replace(cfg.policy.model, lora=dataclasses.replace(cfg.policy.model.lora, r=0),
                                    gradient_checkpointing=False)
        return m


# --------------------------------------------------------------------------- output


def fmt(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def render(plan: StagePlan, gpu_memory_gb: float, device: str) -> str:
    lines = [f"[{plan.stage}] " + plan.header[0]] + [" " * (len(plan.stage) + 3) + h for h in plan.header[1:]]
    width = max(len(p.name) for p in plan.parts) + 2
    for p in plan.parts:
        lines.append(f"  {p.name:<{width}}{fmt(p.bytes):>10}   {p.note}")
    capacity = gpu_memory_gb * GB
    unit = "GPU" if device == "cuda" else "rank"
    verdict = f"{100 * plan.peak / capacity:.0f}% of {gpu_memory_gb:g} GB"
    if plan.peak > capacity:
        verdict = f"WARNING: does not fit in {gpu_memory_gb:g} GB per {unit}"
    elif plan.peak > HEADROOM * capacity:
        verdict += f": tight (leave about {100 - 100 * HEADROOM:.0f}% for the CUDA context and fragmentation)"
    lines.append(f"  {'peak per ' + unit:<{width}}{fmt(plan.peak):>10}   {verdict}")
    return "\n".join(lines)


def main(args: argparse.Namespace, overrides: list[str]) -> int:
    world = World(args.num_gpus or 1, args.num_nodes or 1, args.device)
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    cfgs = load_configs(args.config, overrides, stages, world)
    planner = Planner(cfgs, world)
    over = []
    for stage in cfgs:
        plan = planner.plan(stage)
        print(render(plan, args.gpu_memory_gb, args.device) + "\n", flush=True)
        if plan.peak > args.gpu_memory_gb * GB:
            over.append(stage)
    if over:
        print(f"WARNING: {', '.join(over)} will not fit in {args.gpu_memory_gb:g} GB per "
              f"{'GPU' if args.device == 'cuda' else 'rank'}: more GPUs (ZeRO-3 shards the model states), "
              "gradient checkpointing, smaller micro-batches or offload would help")
        return 1
    return 0
