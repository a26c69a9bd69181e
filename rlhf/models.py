"""Load, build and save the models of every stage, in Hugging Face format.

Two kinds of model:
- causal LMs (policy, reference policy): ``AutoModelForCausalLM``;
- scalar-head models (reward, value): ``AutoModelForSequenceClassification`` with
  ``num_labels=1``, the convention TRL and OpenRLHF use, so reward models move
  freely between their tools and ours.

Sequence scores are read at the last non-padding token found from the attention
mask (positions), never by comparing token ids with pad or EOS.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf.config import LoraConfig, ModelConfig, TokenizerConfig


def load_tokenizer(cfg: TokenizerConfig, model_cfg: ModelConfig | None = None, log=None):
    """The tokenizer from `cfg.path` (or the model's), with a pad token distinct from every
    token that ends a response (see rlhf.tokens.choose_pad). `log` receives one line
    saying how the pad token was chosen."""
    from transformers import AutoTokenizer

    from rlhf.tokens import choose_pad, stop_token_ids

    path = tokenizer_dir(cfg, model_cfg)
    if path is None:
        raise ValueError("tokenizer.path is not set and model.path is not set: nowhere to load a tokenizer from")
    trust = bool(model_cfg and model_cfg.trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"tokenizer.path: cannot load a tokenizer from {path!r}: {first}") from None
    if cfg.chat_template is not None:
        p = Path(cfg.chat_template)
        tok.chat_template = p.read_text() if p.is_file() else cfg.chat_template
    stops = stop_token_ids(tok, path, cfg.stop_tokens)
    choice = choose_pad(tok, cfg.pad_token, stops)
    if log is not None:
        log(f"tokenizer {path}: {choice.describe()}; responses end at {[tok.convert_ids_to_tokens(i) for i in stops]}")
    tok.padding_side = "right"
    return tok


def tokenizer_dir(cfg: TokenizerConfig, model_cfg: ModelConfig | None = None) -> str | None:
    """Where the tokenizer is read: tokenizer.path (a .gguf file is converted like a
    model), else the model's directory."""
    from rlhf.model_source import model_dir

    if cfg.path is not None:
        return model_dir(ModelConfig(path=cfg.path)) if cfg.path.endswith(".gguf") else cfg.path
    return model_dir(model_cfg) if model_cfg is not None else None


def response_stop_ids(tokenizer, cfg: TokenizerConfig, model_cfg: ModelConfig | None = None) -> list[int]:
    """The token ids that end a response for this stage's tokenizer and model."""
    from rlhf.tokens import stop_token_ids

    return stop_token_ids(tokenizer, tokenizer_dir(cfg, model_cfg), cfg.stop_tokens)


def model_type(cfg: ModelConfig) -> str:
    """The HF `model_type` a model config names (read from `path`'s config.json or `arch`)."""
    from transformers import AutoConfig

    from rlhf.model_source import model_dir

    if cfg.arch is not None:
        return cfg.arch["model_type"]
    return AutoConfig.from_pretrained(model_dir(cfg), trust_remote_code=cfg.trust_remote_code).model_type


def require_model_type(model_type: str, supported: set[str], key: str, ability: str) -> None:
    """Refuse, naming the config key that turns the feature off, a model family not known
    (tested) to have the `ability` a feature relies on."""
    if model_type not in supported:
        raise ValueError(f"{key}: model type {model_type!r} is not known to {ability} "
                         f"(supported: {', '.join(sorted(supported))}); set {key}=false")


def _model_config(cfg: ModelConfig, tokenizer, num_labels: int | None = None, dtype: torch.dtype | None = None):
    """The HF config to build or load with. Token ids are set on the model after loading
    (`_finish`): a pad id beyond the checkpoint's vocabulary in the config would reach
    embedding layers that take `padding_idx` from it (Llama's) before the resize."""
    from transformers import AutoConfig

    from rlhf.model_source import model_dir

    if cfg.path is not None:
        config = AutoConfig.from_pretrained(model_dir(cfg), trust_remote_code=cfg.trust_remote_code)
    else:
        arch = dict(cfg.arch)
        config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        config.vocab_size = len(tokenizer)
        config.pad_token_id = tokenizer.pad_token_id
    if cfg.dropout is not None:
        # Every dropout-like field of the HF config (dropout, attention_dropout, resid_pdrop, ...).
        for key, value in list(config.to_dict().items()):
            if isinstance(value, float) and ("dropout" in key or key.endswith("_pdrop")):
                setattr(config, key, cfg.dropout)
    if num_labels is not None:
        config.num_labels = num_labels
    attn = attn_implementation(cfg.attn_implementation, config, dtype)
    if attn is not None:
        config._attn_implementation = attn
    return config


def attn_implementation(requested: str | None, config, dtype: torch.dtype | None) -> str | None:
    """`auto`: FlashAttention-2 on CUDA in bf16/fp16 when the `flash_attn` package is
    installed and the family supports it; otherwise None, transformers' own choice (sdpa
    where the family has it, else eager). Any other value is used as given."""
    if requested != "auto":
        return requested
    from transformers import AutoModelForCausalLM
    from transformers.utils import is_flash_attn_2_available

    if not (torch.cuda.is_available() and dtype in (torch.bfloat16, torch.float16) and is_flash_attn_2_available()):
        return None
    try:
        cls = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        return None
    return "flash_attention_2" if getattr(cls, "_supports_flash_attn", False) else None


def _finish(model: nn.Module, cfg: ModelConfig, tokenizer, stop_ids: list[int] | None = None) -> nn.Module:
    """Grow the embeddings for an added pad token, then make config, generation config
    and tokenizer agree on the special token ids (so the export loads and generates
    correctly in plain transformers: it stops at any of `stop_ids`)."""
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        # The pad token we added (or the tokenizer is larger than the model's vocabulary).
        model.resize_token_embeddings(len(tokenizer))
    embeddings = model.get_input_embeddings()
    if getattr(embeddings, "padding_idx", None) is not None:
        # Built from the checkpoint's config, whose pad may be its EOS (SmolLM2, Llama-3):
        # nn.Embedding never trains its padding_idx row, which would freeze EOS.
        embeddings.padding_idx = tokenizer.pad_token_id
    set_token_ids(model, tokenizer, stop_ids)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def set_token_ids(model: nn.Module, tokenizer, stop_ids: list[int] | None = None) -> None:
    """pad / eos / bos ids of the tokenizer on the model's config and generation config;
    the generation config's eos_token_id lists every stop id when there are several."""
    stops = stop_ids or [tokenizer.eos_token_id]
    for c in (model.config, getattr(model, "generation_config", None)):
        if c is None:
            continue
        c.pad_token_id = tokenizer.pad_token_id
        if tokenizer.bos_token_id is not None:
            c.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]


def load_causal_lm(cfg: ModelConfig, tokenizer, dtype: torch.dtype = torch.float32,
                   stop_ids: list[int] | None = None) -> nn.Module:
    """A causal LM from `cfg.path` (a HF directory, hub name or GGUF file), or randomly
    initialised from `cfg.arch`."""
    from transformers import AutoModelForCausalLM

    from rlhf.model_source import model_dir

    config = _model_config(cfg, tokenizer, dtype=dtype)
    if cfg.path is not None:
        model = AutoModelForCausalLM.from_pretrained(model_dir(cfg), config=config, dtype=dtype,
                                                     trust_remote_code=cfg.trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    return _finish(model, cfg, tokenizer, stop_ids)


def load_scalar_model(cfg: ModelConfig, tokenizer, dtype: torch.dtype = torch.float32,
                      stop_ids: list[int] | None = None) -> nn.Module:
    """A scalar-head model (reward or value) from a causal-LM or reward-model directory,
    or randomly initialised from `cfg.arch`. A new head is initialised by transformers."""
    from transformers import AutoModelForSequenceClassification

    from rlhf.model_source import model_dir

    config = _model_config(cfg, tokenizer, num_labels=1, dtype=dtype)
    if cfg.path is not None:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir(cfg), config=config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    else:
        model = AutoModelForSequenceClassification.from_config(config, dtype=dtype,
                                                               trust_remote_code=cfg.trust_remote_code)
    return _finish(model, cfg, tokenizer, stop_ids)


def apply_lora(model: nn.Module, cfg: LoraConfig, task_type: str) -> nn.Module:
    """Wrap `model` with PEFT LoRA adapters (no-op when cfg.r == 0). The scalar head of
    a reward/value model stays fully trainable (PEFT's SEQ_CLS task does that)."""
    if cfg.r == 0:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    target = cfg.target_modules if cfg.target_modules is not None else "all-linear"
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=target, task_type=task_type)
    return get_peft_model(model, peft_cfg)


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model under a DeepSpeed engine and/or a PEFT wrapper."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def scalar_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(transformer body, linear head) of a sequence-classification model."""
    hf = unwrap(model)
    body = getattr(hf, hf.base_model_prefix, None)
    head = getattr(hf, "score", None) or getattr(hf, "classifier", None)
    # With LoRA, PEFT wraps the head in a ModulesToSaveWrapper that calls its trainable copy.
    linear = getattr(head, "original_module", head)
    if body is None or not isinstance(linear, nn.Linear):
        raise ValueError(f"{type(hf).__name__} has no transformer body + linear `score` head; "
                         "reward and value models need an AutoModelForSequenceClassification of that shape")
    return body, head


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 on the first real token, whatever the padding side."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class ScalarModel(nn.Module):
    """A sequence-classification model read at every position: `forward` returns the
    head's output for each token, `(B, T)` (PPO's values; the reward is read at the
    last token). Wrapping keeps the call inside one module forward, which ZeRO-3's
    parameter hooks expect."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        scalar_head(hf_model)  # refuse early a model whose head we do not know

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`attention_mask` is `(B, T)` (1: real token) or a custom boolean `(B, 1, T, T)`
        (True: may attend; see collate_pairs_shared_prefix), which needs `position_ids`."""
        if attention_mask.dim() == 4:
            if position_ids is None:
                raise ValueError("a 4D attention mask needs position_ids")
            attention_mask = custom_attention_mask(self.hf, attention_mask)
        elif position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        # Looked up per call, not stored: stored submodules would appear twice in state_dict.
        body, head = scalar_head(self.hf)
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state
        return head(hidden).squeeze(-1).float()


def custom_attention_mask(model: nn.Module, allowed: torch.Tensor) -> torch.Tensor:
    """A boolean `(B, 1, T, T)` mask in the form the model's attention takes as-is:
    boolean for SDPA, additive (0 or the dtype's minimum) for eager attention."""
    hf = unwrap(model)
    impl = hf.config._attn_implementation
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        dtype = hf.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    raise ValueError(f"attention implementation {impl!r} does not take a custom 4D mask; "
                     "set reward.shared_prefix=false or model.attn_implementation=sdpa")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token of each row, `(B,)`, from positions only."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def pair_scores(model: nn.Module, batch: dict[str, torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scores `(B,)` of a batch of pairs from one forward pass, in
    either layout: `collate_pairs` (chosen rows then rejected rows) or
    `collate_pairs_shared_prefix` (common prefixes once, custom 4D mask)."""
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    if mask.dim() == 2:
        s = sequence_scores(model, ids, mask)
        half = s.shape[0] // 2
        return s[:half], s[half:]
    values = model(ids, mask, batch["position_ids"].to(device))
    c, r = batch["chosen_index"].to(device), batch["rejected_index"].to(device)
    return values[c[:, 0], c[:, 1]], values[r[:, 0], r[:, 1]]


def sequence_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reward of each sequence: the head at its last non-padding token, `(B,)`.

    `model` is a ScalarModel (or its DeepSpeed engine). Gives the same numbers left-
    or right-padded, and the same numbers as `AutoModelForSequenceClassification`
    loaded from our export (whose pad token is distinct from every real token, so its
    pad-based lookup finds the same token).
    """
    values = model(input_ids, attention_mask)
    idx = last_token_index(attention_mask)
    return values.gather(1, idx[:, None]).squeeze(1)


def save_pretrained(model: nn.Module, state_dict: dict[str, torch.Tensor], tokenizer, out_dir: Path,
                    extra: dict[str, Any] | None = None) -> None:
    """Write `state_dict` as a Hugging Face model directory (safetensors) with the tokenizer.

    LoRA adapters are merged into the base weights first, so the export loads with
    plain transformers. Call on the main rank only.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)
    if isinstance(model, ScalarModel):
        model = model.hf
        state_dict = {k.removeprefix("hf."): v for k, v in state_dict.items()}
    if hasattr(model, "merge_and_unload"):
        model, state_dict = _merged_lora(model, state_dict)
    hf = unwrap(model)
    hf.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if extra:
        (out_dir / "rlhf.json").write_text(json.dumps(extra, indent=1))


def _merged_lora(peft_model: nn.Module, state_dict: dict[str, torch.Tensor]):
    """Merge LoRA weights on a CPU copy built from the config (the engine's own
    parameters may be ZeRO-3 shards, so they are not touched)."""
    import copy

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    base = peft_model.get_base_model()
    auto = AutoModelForSequenceClassification if hasattr(base, "score") else AutoModelForCausalLM
    fresh = auto.from_config(copy.deepcopy(base.config), dtype=torch.float32)
    fresh = get_peft_model(fresh, copy.deepcopy(peft_model.peft_config["default"]))
    fresh.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=False)
    merged = fresh.merge_and_unload()
    dtype = next(iter(state_dict.values())).dtype
    merged = merged.to(dtype)
    return merged, merged.state_dict()
