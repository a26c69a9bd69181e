"""Stage 2: the reward model. A scalar head on a causal-LM body, trained on ranked pairs
with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from rlhf.config import RMConfig
from rlhf.data.batching import collate_pairs, collate_pairs_shared_prefix
from rlhf.losses import pairwise_loss, reward_centering_loss
from rlhf.models import (ScalarModel, apply_lora, load_scalar_model, model_type, pair_scores, require_model_type,
                         save_pretrained)
from rlhf.trainers.base import Trainer


class RewardTrainer(Trainer):
    stage = "rm"
    plot_keys = ["train/loss", "eval/loss", "eval/accuracy", "eval/margin"]

    cfg: RMConfig

    def build_models(self) -> None:
        cfg, bb = self.cfg, self.backbone
        model_cfg = cfg.model
        if cfg.reward.shared_prefix:
            check_shared_prefix_supported(model_type(cfg.model))
            if model_cfg.attn_implementation == "auto":
                # The shared-prefix layout needs a custom mask, which FlashAttention does not take.
                model_cfg = dataclasses.replace(model_cfg, attn_implementation="sdpa")
        with bb.model_init(cfg.deepspeed):
            model = load_scalar_model(model_cfg, self.tokenizer, self.dtype, self.stop_ids)
        model = ScalarModel(apply_lora(model, cfg.model.lora, "SEQ_CLS"))
        self.reward = bb.wrap(model, cfg.deepspeed, cfg.optim, cfg.train.micro_batch_size, self.accumulation,
                              self.total_steps)
        self.engines = {"reward": self.reward}

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if self.cfg.reward.shared_prefix:
            return collate_pairs_shared_prefix(examples, self.tokenizer.pad_token_id, pack=self.cfg.data.packing)
        return collate_pairs(examples, self.tokenizer.pad_token_id)

    def scores(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) scores `(B,)` from one forward pass over the pairs."""
        return pair_scores(self.reward, batch, self.backbone.device)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, chosen scores, rejected scores) of one micro-batch; the loss is the pair mean."""
        chosen, rejected = self.scores(batch)
        margin = batch["margin"].to(chosen.device) if self.cfg.reward.use_margin else None
        loss = pairwise_loss(chosen, rejected, margin)
        if self.cfg.reward.centering_coef > 0:
            loss = loss + self.cfg.reward.centering_coef * reward_centering_loss(chosen, rejected)
        return loss, chosen.detach(), rejected.detach()

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        # Every micro-batch holds the same number of pairs, so DeepSpeed's average over
        # accumulation steps and ranks of per-micro-batch means is the global pair mean.
        bb = self.backbone
        t0 = time.perf_counter()
        loss_sum, correct, chosen_sum, rejected_sum, pairs = 0.0, 0, 0.0, 0.0, 0
        for batch in micro_batches:
            loss, chosen, rejected = self.compute_loss(batch)
            self.reward.backward(loss)
            bb.step(self.reward)
            loss_sum += loss.item() * chosen.numel()
            correct += int((chosen > rejected).sum())
            chosen_sum += chosen.sum().item()
            rejected_sum += rejected.sum().item()
            pairs += chosen.numel()
        t = bb.all_reduce(torch.tensor([loss_sum, correct, chosen_sum, rejected_sum, pairs], dtype=torch.float64))
        n = t[4].item()
        return {
            "train/loss": t[0].item() / n,
            "train/accuracy": t[1].item() / n,
            "train/chosen_score": t[2].item() / n,
            "train/rejected_score": t[3].item() / n,
            "train/lr": self.reward.get_lr()[0],
            "train/grad_norm": bb.grad_norm(self.reward),
            "train/pairs_per_s": n / (time.perf_counter() - t0),
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.reward.eval()
        loss_sum, correct, chosen_sum, rejected_sum, pairs = 0.0, 0, 0.0, 0.0, 0
        for idx, real in self.eval_index_batches(len(self.data.eval)):
            # Padding is only needed where a rank has no real pair left: its forward pass
            # still runs (a collective under ZeRO-3), its result is dropped.
            loss, chosen, rejected = self.compute_loss(self.collate([self.data.eval[i] for i in idx[:max(real, 1)]]))
            if real == 0:
                continue
            loss_sum += loss.item() * chosen.numel()
            correct += int((chosen > rejected).sum())
            chosen_sum += chosen.sum().item()
            rejected_sum += rejected.sum().item()
            pairs += chosen.numel()
        self.reward.train()
        t = self.backbone.all_reduce(torch.tensor([loss_sum, correct, chosen_sum, rejected_sum, pairs],
                                                  dtype=torch.float64))
        n = max(t[4].item(), 1)
        return {
            "eval/loss": t[0].item() / n,
            "eval/accuracy": t[1].item() / n,
            "eval/chosen_score": t[2].item() / n,
            "eval/rejected_score": t[3].item() / n,
            "eval/margin": (t[2].item() - t[3].item()) / n,
        }

    def export(self, out_dir: Path) -> None:
        state = self.backbone.full_state_dict(self.reward)
        if self.backbone.is_main:
            save_pretrained(self.reward.module, state, self.tokenizer, out_dir)


def check_shared_prefix_supported(model_type: str) -> None:
    """reward.shared_prefix relies on the model taking a custom 4D attention mask and
    explicit position ids as given; tests/test_models.py checks these families."""
    require_model_type(model_type, SHARED_PREFIX_MODEL_TYPES, "reward.shared_prefix",
                       "honour custom attention masks")


SHARED_PREFIX_MODEL_TYPES = {"llama", "mistral", "qwen2", "gpt2", "opt"}
