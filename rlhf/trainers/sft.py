"""Stage 1: supervised fine-tuning. Next-token loss on response tokens only."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from rlhf.config import SFTConfig
from rlhf.data.batching import collate_sft, collate_sft_flat
from rlhf.lm_head import causal_logprobs
from rlhf.losses import nll_loss
from rlhf.models import apply_lora, load_causal_lm, model_type, require_model_type, save_pretrained
from rlhf.trainers.base import Trainer


class SFTTrainer(Trainer):
    stage = "sft"
    plot_keys = ["train/loss", "eval/loss", "eval/perplexity", "train/lr"]

    cfg: SFTConfig

    def build_models(self) -> None:
        cfg, bb = self.cfg, self.backbone
        family = model_type(cfg.model)
        if cfg.data.packing:
            check_packing_supported(family)
        if cfg.data.padding_free:
            require_model_type(family, PADDING_FREE_MODEL_TYPES, "data.padding_free",
                               "keep samples in one row apart by their position ids")
        with bb.model_init(cfg.deepspeed):
            model = load_causal_lm(cfg.model, self.tokenizer, self.dtype, self.stop_ids)
        self.padding_free = cfg.data.padding_free
        if self.padding_free is None:
            self.padding_free = (model.config._attn_implementation == "flash_attention_2"
                                 and family in PADDING_FREE_MODEL_TYPES)
        model = apply_lora(model, cfg.model.lora, "CAUSAL_LM")
        self.policy = bb.wrap(model, cfg.deepspeed, cfg.optim, cfg.train.micro_batch_size, self.accumulation,
                              self.total_steps)
        self.engines = {"policy": self.policy}

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if self.padding_free:
            return collate_sft_flat(examples)
        return collate_sft(examples, self.tokenizer.pad_token_id)

    def target_logprobs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """log p of the target tokens `(B, T - first)` and their loss mask, from `first`,
        the batch's first column that holds a target.

        Only target positions go through the LM head (prompt and padding positions
        predict nothing we train on), in chunks of model.logits_chunk_mib MiB of logits
        (rlhf/lm_head.py): the full (tokens x vocabulary) logits never exist.
        """
        dev = self.backbone.device
        first = first_target(batch["loss_mask"])
        mask = batch["loss_mask"][:, first:].to(dev)
        attention_mask = None if batch["attention_mask"] is None else batch["attention_mask"].to(dev)
        logprobs, _ = causal_logprobs(self.policy, batch["input_ids"].to(dev), attention_mask,
                                      batch["position_ids"].to(dev), first, mask,
                                      chunk_mib=self.cfg.model.logits_chunk_mib)
        return logprobs, mask

    def compute_loss(self, batch: dict[str, torch.Tensor], normalizer: float | None) -> torch.Tensor:
        """Summed response-token NLL of this micro-batch divided by `normalizer`."""
        return nll_loss(*self.target_logprobs(batch), normalizer)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        bb = self.backbone
        t0 = time.perf_counter()
        # Normalise by the response tokens of the whole global batch (all micro-batches,
        # all ranks), not per micro-batch: then accumulating 4 micro-batches of 2 gives
        # exactly the gradient of one batch of 8, whatever their lengths. DeepSpeed
        # divides by accumulation steps and averages over ranks, so multiply that back.
        local_targets = sum(int(b["loss_mask"][:, 1:].sum()) for b in micro_batches)
        local_tokens = sum(int((b["input_ids"] != self.tokenizer.pad_token_id).sum()) if b["attention_mask"] is None
                           else int(b["attention_mask"].sum()) for b in micro_batches)
        counts = bb.all_reduce(torch.tensor([local_targets, local_tokens], dtype=torch.float64))
        normalizer = counts[0].clamp(min=1).item() / (self.accumulation * bb.world_size)
        loss_sum = 0.0
        for batch in micro_batches:
            loss = self.compute_loss(batch, normalizer)
            self.policy.backward(loss)
            bb.step(self.policy)
            loss_sum += loss.item()
        loss_total = bb.all_reduce(torch.tensor(loss_sum)).item() / (self.accumulation * bb.world_size)
        elapsed = time.perf_counter() - t0
        return {
            "train/loss": loss_total,
            "train/lr": self.policy.get_lr()[0],
            "train/grad_norm": bb.grad_norm(self.policy),
            "train/tokens_per_s": counts[1].item() / elapsed,
            "train/response_tokens": counts[0].item(),
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.policy.eval()
        nll, count = 0.0, 0
        for idx, real in self.eval_index_batches(len(self.data.eval)):
            # Padding is only needed where a rank has no real sample left: its forward pass
            # still runs (a collective under ZeRO-3), and counts for nothing.
            batch = self.collate([self.data.eval[i] for i in idx[:max(real, 1)]])
            batch["loss_mask"][real:] = 0
            nll += self.compute_loss(batch, 1.0).item()
            count += int(batch["loss_mask"][:, 1:].sum())
        self.policy.train()
        loss = self.mean_over_ranks(nll, count)
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}

    def export(self, out_dir: Path) -> None:
        state = self.backbone.full_state_dict(self.policy)
        if self.backbone.is_main:
            save_pretrained(self.policy.module, state, self.tokenizer, out_dir)


def first_target(loss_mask: torch.Tensor) -> int:
    """The first position (>= 1) at which any row of the batch has a target token."""
    has = loss_mask[:, 1:].bool().any(dim=0)
    return int(has.nonzero()[0]) + 1 if has.any() else loss_mask.shape[1] - 1


def check_packing_supported(model_type: str) -> None:
    """Packing relies on transformers building a block-diagonal mask from position_ids
    (when no attention mask is given). OPT, for one, builds its mask without them, so
    packed samples would attend to each other: models outside this list, which is what
    tests/test_models.py checks, are refused rather than trained wrongly."""
    require_model_type(model_type, PACKING_MODEL_TYPES, "data.packing", "keep packed samples apart")


PACKING_MODEL_TYPES = {"llama", "mistral", "qwen2", "gpt2"}

PADDING_FREE_MODEL_TYPES = {"llama", "mistral", "qwen2"}
"""Families whose attention takes position ids through to FlashAttention-2's
variable-length path and whose sdpa/eager masks transformers builds from them
(tests/test_sft.py checks the same loss as padded rows on the CPU)."""
