"""vLLM as the rollout engine: one in-process engine per rank, colocated with training.

The engine starts from the policy's config and tokenizer with placeholder weights
(`load_format="dummy"`, nothing exported to disk) and receives the real ones through
`sync_weights` at once, then after every policy update:

    policy (DeepSpeed, ZeRO 0-3, maybe LoRA)
      --hf_weights-->  (HF name, full tensor), one module at a time: ZeRO-3 shards
                       gathered through Backbone, LoRA merged as W + scale * B @ A
      --worker.reload_weights-->  vLLM's own parameters (fused, repacked as it likes)

so no second full copy of the model is ever held. Sampling is mapped setting by
setting (`sampling_params`); the policy's "old" log-probs are recomputed by the
training engine (rollout.logprobs_from_generation is refused with vLLM): vLLM's
kernels round differently, and PPO's ratio must start at 1.

On several ranks every rank runs its own engine on its own prompts (vLLM's
"external_launcher" with data_parallel_size = ranks / tensor_parallel_size) inside
our process group, which must exist first (Backbone creates it).
"""

from __future__ import annotations

import atexit
import copy
import os
import tempfile
from typing import Iterator

import torch

from rlhf.config import RolloutConfig
from rlhf.data.batching import collate_prompts
from rlhf.models import unwrap
from rlhf.rollout.engine import Rollout, RolloutEngine
from rlhf.rollout.hf import end_at_eos

# The engine runs in this process (no engine-core subprocess): it must see the weights
# we hand it and our process group. Set before vLLM is imported.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


class VLLMEngine(RolloutEngine):
    """Samples with vLLM; `generate` returns the same Rollout layout as HFEngine
    (left-padded prompts, responses padded after the first stop token, action mask)."""

    def __init__(self, policy, cfg: RolloutConfig, tokenizer, backbone, stop_ids: list[int], seed: int,
                 max_model_len: int):
        from vllm import LLM

        self.cfg, self.tokenizer, self.backbone, self.stop_ids = cfg, tokenizer, backbone, stop_ids
        v = cfg.vllm
        on_cuda = backbone.device.type == "cuda"
        self.sleep_mode = v.enable_sleep_mode and on_cuda
        self.tp = v.tensor_parallel_size
        hf = unwrap(policy)
        # Every id but pad, up to the model's vocabulary (vLLM masks the rest to -inf).
        self.allowed_ids = [i for i in range(hf.config.vocab_size) if i != tokenizer.pad_token_id]
        # Config and tokenizer only: the weights come through sync_weights.
        self._dir = tempfile.TemporaryDirectory(prefix="rlhf-vllm-")
        config = copy.deepcopy(hf.config)
        config.architectures = [type(hf).__name__]  # vLLM picks its model class from this
        # Tied input and output embeddings come as two tensors (hf_weights names both): a
        # tied engine reloads the embedding only, and a backend that repacks the output
        # layer (vLLM's CPU GEMMs) would keep sampling from the old one.
        config.tie_word_embeddings = False
        config.save_pretrained(self._dir.name)
        tokenizer.save_pretrained(self._dir.name)
        dtype = str(hf.dtype).removeprefix("torch.")
        kv_gb = v.kv_cache_gb if v.kv_cache_gb is not None or on_cuda else 0.5
        memory = dict(gpu_memory_utilization=v.gpu_memory_utilization)
        if kv_gb is not None:
            memory["kv_cache_memory_bytes"] = int(kv_gb * 2**30)
        # The default (longest prompt + response) capped at what the model can position.
        positions = getattr(config, "max_position_embeddings", None) or max_model_len
        world = backbone.world_size
        launcher = dict(distributed_executor_backend="uni") if world == 1 and self.tp == 1 else \
            dict(distributed_executor_backend="external_launcher", data_parallel_size=world // self.tp)
        self.llm = LLM(model=self._dir.name, tokenizer=self._dir.name, load_format="dummy", dtype=dtype,
                       seed=seed, tensor_parallel_size=self.tp, **memory,
                       max_model_len=v.max_model_len or min(max_model_len, positions), enforce_eager=not on_cuda,
                       enable_sleep_mode=self.sleep_mode, generation_config="vllm", **launcher)
        self.awake = {"weights", "kv_cache"}
        # Shut down before Backbone's exit handler ends the process group (vLLM's own
        # finalizer runs after it and fails on the groups that are gone).
        atexit.register(self.shutdown)
        self.sync_weights(policy)

    def shutdown(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()

    # ------------------------------------------------------------------ sampling

    def sampling_params(self, greedy: bool, seed: int | None):
        """The rollout settings as vLLM's SamplingParams, one for one: temperature, top-k,
        top-p, min/max new tokens, the stop ids (and nothing else: the model's own
        generation_config is ignored, `generation_config="vllm"`), pad never drawn (an
        exact -inf mask, where logit_bias would be clamped to -100), a per-row seed."""
        from vllm import SamplingParams

        c = self.cfg
        return SamplingParams(
            n=1, max_tokens=c.max_new_tokens, min_tokens=c.min_new_tokens,
            temperature=0.0 if greedy else c.temperature, top_k=0 if greedy else c.top_k,
            top_p=1.0 if greedy else c.top_p, stop_token_ids=list(self.stop_ids),
            allowed_token_ids=self.allowed_ids,
            seed=seed, detokenize=False, skip_special_tokens=False)

    def generate(self, prompts: list[dict], n: int = 1, greedy: bool = False) -> Rollout:
        rows = [p for p in prompts for _ in range(n)]
        # One seed per row drawn from torch's RNG (seeded per rank by the trainer, saved
        # in checkpoints): reproducible, and different at every call.
        seeds = torch.randint(0, 2**31 - 1, (len(rows),)).tolist()
        requests = self.tensor_parallel_share([(list(r["prompt_ids"]), s) for r, s in zip(rows, seeds)])
        params = [self.sampling_params(greedy, None if greedy else s) for _, s in requests]
        self.wake_up()
        outs = self.llm.generate([{"prompt_token_ids": i} for i, _ in requests], params, use_tqdm=False)
        self.sleep()
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        tokens = tokens[self.my_rows(len(rows))] if self.tp > 1 else tokens
        return self.as_rollout(rows, tokens)

    def as_rollout(self, rows: list[dict], tokens: list[list[int]]) -> Rollout:
        """HFEngine's layout: prompts left-padded, responses right-padded to the longest
        one, pad after the first stop token, the action mask up to and including it."""
        pad = self.tokenizer.pad_token_id
        dev = self.backbone.device
        batch = collate_prompts(rows, pad)
        R = max(1, max(len(t) for t in tokens))
        response = torch.full((len(rows), R), pad, dtype=torch.long)
        for i, t in enumerate(tokens):
            response[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        response, action_mask = end_at_eos(response, self.stop_ids, pad)
        return Rollout(batch["input_ids"].to(dev), batch["attention_mask"].to(dev), response.to(dev),
                       action_mask.to(dev), None, rows)

    # With tensor parallelism the ranks of one vLLM group (consecutive ranks) must make
    # the same requests (seeds included): they generate their rows together and each
    # keeps its own.
    def tensor_parallel_share(self, requests: list[tuple[list[int], int]]) -> list[tuple[list[int], int]]:
        if self.tp == 1:
            return requests
        everyone = self.backbone.all_gather_object(requests)
        group = self.backbone.rank // self.tp * self.tp
        return [r for of_rank in everyone[group:group + self.tp] for r in of_rank]

    def my_rows(self, count: int) -> slice:
        start = (self.backbone.rank % self.tp) * count  # every rank of a group has the same count
        return slice(start, start + count)

    # ------------------------------------------------------------------ weights

    def sync_weights(self, policy) -> None:
        """Push the policy's current weights into the engine (every rank, in step: under
        ZeRO-3 each gather is a collective), then drop the prefix cache, whose KV entries
        came from the old weights."""
        self.wake_up(("weights",))
        worker = self.llm.llm_engine.model_executor.driver_worker.worker
        worker.reload_weights(weights_iterator=hf_weights(policy, self.backbone))
        self.llm.reset_prefix_cache()

    @torch.no_grad()
    def max_logprob_difference(self, policy, sequences: list[list[int]]) -> float:
        """The check that the engine holds the policy's weights: the largest difference
        between vLLM's log-prob of each token of `sequences` (given the tokens before it)
        and the training engine's. vLLM fuses and repacks its parameters (qkv_proj, CPU
        weight layouts), so the weights are compared through what they compute: in fp32
        equal up to rounding (1e-4), while one optimizer step apart they differ visibly."""
        from vllm import SamplingParams

        from rlhf.rollout.hf import generation_context, response_logprobs

        self.wake_up()
        outs = self.llm.generate([{"prompt_token_ids": s} for s in sequences],
                                 SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)
        self.sleep()
        worst = 0.0
        was_training = policy.training
        policy.eval()
        with generation_context(policy, policy.zero_optimization_stage()):
            for s, o in zip(sequences, outs):
                theirs = torch.tensor([d[tok].logprob for d, tok in zip(o.prompt_logprobs[1:], s[1:])])
                ids = torch.tensor([s], device=self.backbone.device)
                ours = response_logprobs(policy.module, ids, torch.ones_like(ids), 1)[0].cpu()
                worst = max(worst, (ours - theirs).abs().max().item())
        if was_training:
            policy.train()
        return worst

    # ------------------------------------------------------------------ sleep (CUDA)

    # While the policy trains, vLLM's KV cache is freed and its weights moved to host
    # memory (level 1), so the two do not compete for device memory. The weights wake
    # alone to be synced; everything wakes to generate.
    def sleep(self) -> None:
        if self.sleep_mode and self.awake:
            self.llm.sleep(level=1)
            self.awake = set()

    def wake_up(self, tags: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        todo = [t for t in tags if t not in self.awake]
        if self.sleep_mode and todo:
            self.llm.wake_up(tags=todo)
            self.awake.update(todo)


def hf_weights(model, backbone) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights of a causal LM (under DeepSpeed and/or PEFT) as (Hugging Face name,
    full tensor), as its checkpoint would hold them, one module at a time: a ZeRO-3
    module's shards are gathered (Backbone.gathered) while its tensors are handed out
    and released after, so the whole model is never held twice. A LoRA layer comes out
    merged, `base + scale * B @ A` (PEFT's own delta, which knows fan-in/fan-out), under
    its plain name (`...q_proj.weight`). A tied weight comes out under each of its names
    (`model.embed_tokens.weight` and `lm_head.weight`).

    Every rank must consume the iterator fully (the gathers are collectives)."""
    from peft.tuners.lora import LoraLayer

    hf = unwrap(model)
    lora_prefixes: list[str] = []
    for name, module in hf.named_modules():
        if any(name.startswith(p) for p in lora_prefixes):
            continue
        if isinstance(module, LoraLayer):
            lora_prefixes.append(name + ".")
            base = module.get_base_layer()
            with backbone.gathered([module]):
                weight = base.weight.detach().clone()
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        weight += module.get_delta_weight(adapter).to(weight.dtype)
                yield f"{name}.weight", weight
                if base.bias is not None:
                    yield f"{name}.bias", base.bias.detach().clone()
            continue
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        with backbone.gathered([module]):
            for n, p in own:
                # A gathered shard's storage goes back to DeepSpeed after the context:
                # vLLM may keep a tensor until its layer is complete, so it gets a copy.
                yield (f"{name}.{n}" if name else n), p.detach().clone() if hasattr(p, "ds_id") else p.detach()
