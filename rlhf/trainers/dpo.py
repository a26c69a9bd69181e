"""Direct preference optimisation (Rafailov et al. 2023): the policy trained on ranked pairs
against a frozen reference, with no reward model and no sampling during training.

`Trainer.train` runs the steps; this trainer supplies them:

    collate             pairs -> one batch: the shared-prefix layout (each pair's prompt
                        computed once) or chosen rows then rejected rows, with the position
                        of every response token and the token that predicts it
    sequence_logprobs   one forward pass: the chosen and rejected log-probs `(B,)`
    reference_logprobs  the same under the reference: precomputed, or a frozen pass
    compute_loss        dpo_loss (sigmoid, conservative, IPO); DeepSpeed averages the
                        micro-batches' pair means, which is the global pair mean

With dpo.reference=precompute (the default) every pair is scored by the reference once,
before the first step (`precompute_reference`), and the values travel with the examples.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from pathlib import Path

import torch

from rlhf.config import DPOConfig, ModelConfig, RolloutConfig
from rlhf.data.batching import collate_pairs, collate_pairs_shared_prefix, collate_prompts, common_prefix_length
from rlhf.lm_head import picked_logprobs
from rlhf.losses import dpo_loss, sequence_logprobs
from rlhf.models import (apply_lora, custom_attention_mask, load_causal_lm, model_type, position_ids_from_mask,
                         save_pretrained)
from rlhf.rollout import generate, is_stop, torch_linear
from rlhf.trainers.base import Trainer
from rlhf.trainers.reward import check_shared_prefix_supported

REF_FILE = "ref_logprobs.pt"
STATS = ("loss", "reward_accuracy", "chosen_reward", "rejected_reward", "margin", "chosen_nll", "chosen_logp",
         "rejected_logp", "pairs")
"""What a step and an evaluation report, as pair means (`pairs` is the count)."""


class DPOTrainer(Trainer):
    stage = "dpo"
    plot_keys = ["train/loss", "eval/loss", "eval/reward_accuracy", "eval/margin", "eval/gold_reward"]
    progress_keys = ["train/loss", "train/reward_accuracy", "train/pairs_per_s"]

    cfg: DPOConfig

    # ================================================================== setup

    def build_models(self) -> None:
        cfg, bb = self.cfg, self.backbone
        if cfg.dpo.shared_prefix:
            check_shared_prefix_supported(model_type(cfg.model))
            if cfg.has_own_reference():
                check_shared_prefix_supported(model_type(cfg.ref_model))
        with bb.model_init(cfg.deepspeed):
            model = load_causal_lm(self.role_model("policy"), self.tokenizer, self.dtype, self.stop_ids)
        model = apply_lora(model, cfg.model.lora, "CAUSAL_LM")
        self.policy = bb.wrap(model, cfg.deepspeed, cfg.optim, cfg.train.micro_batch_size, self.accumulation,
                              self.total_steps)
        self.engines = {"policy": self.policy}
        self.ref_policy = self.load_reference() if cfg.dpo.reference == "live" else None
        self.reference_time_s = 0.0  # seconds spent scoring the pairs with the reference, up front
        self.gold_reward = None
        if cfg.task is not None:
            from rlhf.task import gold_function

            self.gold_reward = gold_function(cfg.task)
        # Sampled evaluation answers each held-out prompt once.
        seen: dict[tuple[int, ...], None] = {}
        for e in self.data.eval:
            seen.setdefault(tuple(e["chosen_ids"][:e["prompt_length"]]), None)
        self.eval_prompts = [list(p) for p in seen][:cfg.eval_sampling.prompts]

    def role_model(self, role: str) -> ModelConfig:
        """The model config of the policy or the reference (the policy's start unless
        ref_model names one), without dropout when dpo.disable_dropout."""
        cfg = self.cfg
        m = cfg.model
        if role == "ref_policy":
            m = cfg.ref_model if cfg.has_own_reference() else dataclasses.replace(
                m, lora=dataclasses.replace(m.lora, r=0), gradient_checkpointing=False)
        if cfg.dpo.shared_prefix and m.attn_implementation == "auto":
            # The shared-prefix layout needs a custom mask, which FlashAttention does not take.
            m = dataclasses.replace(m, attn_implementation="sdpa")
        return dataclasses.replace(m, dropout=0.0) if cfg.dpo.disable_dropout else m

    def load_reference(self):
        """A frozen engine of the reference."""
        bb = self.backbone
        with bb.model_init(self.cfg.deepspeed, trainable=False):
            ref = load_causal_lm(self.role_model("ref_policy"), self.tokenizer, self.dtype, self.stop_ids)
        return bb.wrap(ref, self.cfg.deepspeed)

    def resume(self) -> None:
        # Before the checkpoint is loaded: the policy still holds its starting weights,
        # which are the default reference.
        if self.cfg.dpo.reference == "precompute":
            self.precompute_reference()
        super().resume()
        if self.reference_time_s:
            self.log({"time/reference_s": self.reference_time_s})

    # ------------------------------------------------------------------ reference log-probs, once

    def precompute_reference(self) -> None:
        """The reference's log-probs of every train and eval pair, attached to the examples
        (`ref_chosen_logp`, `ref_rejected_logp`). Read from OUTPUT_DIR/ref_logprobs.pt when
        a run (this one, before it was interrupted) wrote it for the same reference and data;
        otherwise computed, each rank scoring its share, and written there."""
        cfg, bb = self.cfg, self.backbone
        path = self.out / REF_FILE
        key = json.dumps({"ref_model": dataclasses.asdict(self.role_model("ref_policy")), "seed": cfg.seed,
                          "length_normalized": cfg.dpo.length_normalized, "data": self.data.summary,
                          "pairs": [len(self.data.train), len(self.data.eval)]}, sort_keys=True, default=str)
        saved = None
        if bb.is_main and path.exists():
            saved = torch.load(path, weights_only=True)
            if saved["key"] != key:
                bb.print(f"[dpo] {path} was computed for another reference or data: computing it again")
                saved = None
        if bb.broadcast_object(saved is not None):
            saved = torch.load(path, weights_only=True)
            tables = {"train": saved["train"], "eval": saved["eval"]}
            bb.print(f"[dpo] reference log-probs read from {path}")
        else:
            t0 = time.perf_counter()
            # Called before any checkpoint is loaded, the policy holds its starting weights:
            # it is the default reference, and no second model is needed.
            engine = self.load_reference() if cfg.has_own_reference() else self.policy
            tables = {"train": self.score_pairs(engine, self.data.train),
                      "eval": self.score_pairs(engine, self.data.eval)}
            if engine is not self.policy:
                del engine  # not needed again: freed before training
                gc.collect()
            self.reference_time_s = time.perf_counter() - t0
            if bb.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                torch.save({"key": key, **tables}, tmp)
                os.replace(tmp, path)  # atomic: a reader never sees half a file
            bb.print(f"[dpo] reference log-probs of {len(self.data.train)} + {len(self.data.eval)} pairs "
                     f"written to {path}")
        for split, examples in (("train", self.data.train), ("eval", self.data.eval)):
            for e, (c, r) in zip(examples, tables[split].tolist()):
                e["ref_chosen_logp"], e["ref_rejected_logp"] = c, r

    @torch.no_grad()
    def score_pairs(self, engine, examples: list[dict]) -> torch.Tensor:
        """(chosen, rejected) sequence log-probs `(N, 2)` of `engine` on every example, on
        every rank (each rank scores a share, the same number of passes on each, and the
        shares are exchanged). Examples go through in order of length, so that a batch
        holds pairs of about one length and little of it is padding."""
        bb = self.backbone
        if not examples:
            return torch.zeros(0, 2)
        size = self.cfg.train.eval_batch_size or self.cfg.train.micro_batch_size
        by_length = sorted(range(len(examples)), key=lambda i: pair_length(examples[i]))
        share, real = rank_share(len(examples), bb.world_size, bb.rank)
        idx = [by_length[i] for i in share]
        was_training = engine.training
        engine.eval()
        out = []
        with torch_linear():
            for i in range(0, len(idx), size):
                batch = self.collate([examples[j] for j in idx[i:i + size]])
                out.append(torch.stack(self.sequence_logprobs(engine, batch), dim=1).float().cpu())
        if was_training:
            engine.train()
        table = torch.zeros(len(examples), 2)
        for ids, values in bb.all_gather_object((idx[:real], torch.cat(out)[:real])):
            table[ids] = values
        return table

    # ================================================================== one step

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return collate_dpo(examples, self.tokenizer.pad_token_id, self.cfg.dpo.shared_prefix, self.cfg.data.packing)

    def sequence_logprobs(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen and rejected log-probs `(B,)` of a batch under `engine` (one forward pass)."""
        chunk_mib = self.role_model("policy" if engine is self.policy else "ref_policy").logits_chunk_mib
        return pair_logprobs(engine, batch, self.backbone.device, self.cfg.dpo.length_normalized, chunk_mib)

    def reference_logprobs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's chosen and rejected log-probs `(B,)`: precomputed, or a frozen pass."""
        dev = self.backbone.device
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"].to(dev), batch["ref_rejected_logps"].to(dev)
        with torch.no_grad(), torch_linear():
            return self.sequence_logprobs(self.ref_policy, batch)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The DPO loss of one micro-batch (a pair mean) and its detached stats (batch means)."""
        d = self.cfg.dpo
        chosen, rejected = self.sequence_logprobs(self.policy, batch)
        ref_chosen, ref_rejected = self.reference_logprobs(batch)
        lengths = None if d.length_normalized else response_lengths(batch)[:num_pairs(batch)].to(chosen.device)
        loss, stats = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, d.beta, d.loss_type, d.label_smoothing,
                               d.nll_weight, lengths)
        stats.update(chosen_logp=chosen.detach().mean(), rejected_logp=rejected.detach().mean())
        return loss, stats

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        # Every micro-batch holds the same number of pairs, so DeepSpeed's average over
        # accumulation steps and ranks of per-micro-batch means is the global pair mean.
        t0 = time.perf_counter()
        sums = dict.fromkeys(STATS, 0.0)
        for batch in micro_batches:
            loss, stats = self.compute_loss(batch)
            self.policy.backward(loss)
            self.backbone.step(self.policy)
            add_stats(sums, loss, stats, batch)
        out = self.reduce(sums, "train")
        out.update({"train/lr": self.policy.get_lr()[0], "train/grad_norm": self.backbone.grad_norm(self.policy),
                    "train/pairs_per_s": out.pop("train/pairs") / (time.perf_counter() - t0)})
        return out

    def reduce(self, sums: dict[str, float], prefix: str) -> dict[str, float]:
        """Pair means over all ranks of the summed stats; `{prefix}/pairs` is the count."""
        t = self.backbone.all_reduce(torch.tensor([sums[k] for k in STATS], dtype=torch.float64))
        total = dict(zip(STATS, t.tolist()))
        n = max(total.pop("pairs"), 1.0)
        return {f"{prefix}/{k}": v / n for k, v in total.items()} | {f"{prefix}/pairs": n}

    # ================================================================== evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """DPO loss, reward accuracy and implicit rewards on the held-out pairs; and, with
        eval_sampling.prompts, responses sampled to held-out prompts (length, EOS rate, and
        the built-in task's gold reward)."""
        self.policy.eval()
        sums = dict.fromkeys(STATS, 0.0)  # the same keys on every rank, even one without pairs
        with torch_linear():
            for idx, real in self.eval_index_batches(len(self.data.eval)):
                # A rank out of real pairs still runs a pass (a collective under ZeRO-3) that counts for nothing.
                batch = self.collate([self.data.eval[i] for i in idx[:max(real, 1)]])
                loss, stats = self.compute_loss(batch)
                if real:
                    add_stats(sums, loss, stats, batch)
        self.policy.train()
        out = self.reduce(sums, "eval")
        out.pop("eval/pairs")
        out.update(self.sample_eval())
        return out

    def sample_eval(self) -> dict[str, float]:
        """Responses sampled with a fixed seed in a forked RNG (evaluating changes nothing
        in training), every rank answering an equal share of the prompts."""
        cfg, bb = self.cfg, self.backbone
        if not self.eval_prompts:
            return {}
        idx, real = rank_share(len(self.eval_prompts), bb.world_size, bb.rank)
        prompts = [self.eval_prompts[i] for i in idx]
        batch = collate_prompts([{"prompt_ids": p} for p in prompts], self.tokenizer.pad_token_id)
        s = cfg.eval_sampling
        rollout = RolloutConfig(batch_size=len(prompts), max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                top_k=s.top_k, top_p=s.top_p,
                                micro_batch_size=cfg.train.eval_batch_size or cfg.train.micro_batch_size)
        dev = bb.device
        with bb.fork_rng(cfg.seed + 7919 * (bb.rank + 1)):
            response, action_mask, _ = generate(self.policy, batch["input_ids"].to(dev),
                                                batch["attention_mask"].to(dev), rollout, self.tokenizer,
                                                cfg.deepspeed.zero_stage, stop_ids=self.stop_ids)
        response, action_mask = response[:real].cpu(), action_mask[:real].cpu()
        eos = (is_stop(response, self.stop_ids) & action_mask.bool()).any(1)
        sums = [action_mask.sum().item(), eos.sum().item(), 0.0, float(real)]
        if self.gold_reward is not None:
            for p, r, m in zip(prompts, response, action_mask):
                text = self.tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True)
                sums[2] += self.gold_reward(self.tokenizer.decode(p, skip_special_tokens=True), text)
        t = bb.all_reduce(torch.tensor(sums, dtype=torch.float64)).tolist()
        out = {"eval/response_length": t[0] / t[3], "eval/eos_rate": t[1] / t[3]}
        if self.gold_reward is not None:
            out["eval/gold_reward"] = t[2] / t[3]
        return out

    # ================================================================== export

    def export(self, out_dir: Path) -> None:
        state = self.backbone.full_state_dict(self.policy)
        if self.backbone.is_main:
            save_pretrained(self.policy.module, state, self.tokenizer, out_dir)


def collate_dpo(examples: list[dict], pad_id: int, shared_prefix: bool = True, pack: bool = False) -> dict:
    """A batch of pairs: `collate_pairs_shared_prefix` (with `pack`, pairs side by side in
    rows) or `collate_pairs` (chosen rows, then rejected rows) with position ids, plus the
    `response_targets` and, when the examples carry them, the precomputed reference
    log-probs `ref_chosen_logps` and `ref_rejected_logps` `(B,)`."""
    if shared_prefix:
        batch = collate_pairs_shared_prefix(examples, pad_id, pack=pack)
    else:
        batch = collate_pairs(examples, pad_id)
        batch["position_ids"] = position_ids_from_mask(batch["attention_mask"])
    batch.update(response_targets(examples, batch))
    if "ref_chosen_logp" in examples[0]:
        batch["ref_chosen_logps"] = torch.tensor([e["ref_chosen_logp"] for e in examples])
        batch["ref_rejected_logps"] = torch.tensor([e["ref_rejected_logp"] for e in examples])
    return batch


def pair_logprobs(model, batch: dict[str, torch.Tensor], device, average: bool = False,
                  chunk_mib: float = ModelConfig.logits_chunk_mib) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected sequence log-probs `(B,)` of a `DPOTrainer.collate` batch under a
    causal LM (plain, PEFT or a DeepSpeed engine), from one forward pass: summed over
    response tokens, or averaged with `average`. The LM head runs only on the positions
    that predict a response token, `chunk_mib` MiB of float32 logits at a time
    (rlhf.lm_head.picked_logprobs)."""
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    if mask.dim() == 4:
        mask = custom_attention_mask(model, mask)
    cols = batch["target_cols"].to(device)
    start = int(cols.min())
    token_logprobs = picked_logprobs(model, batch["target_rows"].to(device), cols - start,
                                     batch["target_ids"].to(device), chunk_mib, input_ids=ids, attention_mask=mask,
                                     position_ids=batch["position_ids"].to(device), use_cache=False,
                                     logits_to_keep=ids.shape[1] - start)
    n = num_pairs(batch)
    seq = sequence_logprobs(token_logprobs, batch["target_seq"].to(device), 2 * n, average)
    return seq[:n], seq[n:]


def num_pairs(batch: dict[str, torch.Tensor]) -> int:
    return batch["chosen_index"].shape[0] if "chosen_index" in batch else batch["input_ids"].shape[0] // 2


def response_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Response tokens `(2B,)` of each sequence of a batch (chosen, then rejected)."""
    return torch.bincount(batch["target_seq"], minlength=2 * num_pairs(batch))


def add_stats(sums: dict[str, float], loss: torch.Tensor, stats: dict[str, torch.Tensor], batch) -> None:
    """Add a micro-batch's pair means, times its pair count, to `sums`."""
    n = num_pairs(batch)
    for k, v in {"loss": loss.detach(), **stats}.items():
        sums[k] += v.item() * n
    sums["pairs"] += n


def pair_length(e: dict) -> int:
    """Tokens of a pair in the shared-prefix layout: the common prefix once, both suffixes."""
    c, r = e["chosen_ids"], e["rejected_ids"]
    return len(c) + len(r) - common_prefix_length(c, r)


def rank_share(n: int, world_size: int, rank: int) -> tuple[list[int], int]:
    """This rank's contiguous share of `n` items, padded (with item 0) to the same length on
    every rank, so that every rank runs the same number of forward passes (ZeRO-3 gathers
    parameters collectively in each); and how many of them are real."""
    per = -(-n // world_size)
    mine = list(range(rank * per, min(n, (rank + 1) * per)))
    return mine + [0] * (per - len(mine)), len(mine)


def response_targets(examples: list[dict], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Where each response token of a batch of pairs sits, in either layout.

    For every response token (prompt excluded; EOS included): `target_rows` and
    `target_cols`, the position whose output predicts it; `target_ids`, the token;
    `target_seq`, its sequence (pair i's chosen is i, its rejected B + i). All `(N,)`.

    In separate rows (`collate_pairs`) token t of a row is predicted at column t - 1.
    In the shared-prefix layout (`collate_pairs_shared_prefix`) a pair is one segment
    `c[:k] + c[k:] + r[k:]` (k: the common prefix) starting at column `a`: the chosen
    sequence is contiguous, but rejected token t >= k sits at `a + len(c) + t - k`, and the
    first token of its suffix (t = k) is predicted by the last prefix token, at `a + k - 1`,
    which is also where chosen token k is predicted. An empty suffix has no token here.
    """
    rows, cols, ids, seq = [], [], [], []
    shared = "chosen_index" in batch
    B = len(examples)
    for i, e in enumerate(examples):
        c, r = e["chosen_ids"], e["rejected_ids"]
        first = max(e["prompt_length"], 1)  # the first token is never predicted
        if shared:
            row, last = batch["chosen_index"][i].tolist()
            a = last - (len(c) - 1)  # the segment's first column
            k = common_prefix_length(c, r)
            c_cols = [a + t - 1 for t in range(first, len(c))]
            r_cols = [a + t - 1 if t - 1 < k else a + len(c) + t - 1 - k for t in range(first, len(r))]
            c_row = r_row = row
        else:
            c_cols = [t - 1 for t in range(first, len(c))]
            r_cols = [t - 1 for t in range(first, len(r))]
            c_row, r_row = i, B + i
        rows += [c_row] * len(c_cols) + [r_row] * len(r_cols)
        cols += c_cols + r_cols
        ids += c[first:] + r[first:]
        seq += [i] * len(c_cols) + [B + i] * len(r_cols)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return {"target_rows": as_long(rows), "target_cols": as_long(cols), "target_ids": as_long(ids),
            "target_seq": as_long(seq)}
