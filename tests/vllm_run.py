"""Run by tests/test_vllm.py in a process of its own (vLLM's engine keeps process-wide
state), on 1 rank or under the deepspeed launcher on 2:

    python tests/vllm_run.py sync TOKENIZER_DIR ZERO_STAGE LORA_R
    python tests/vllm_run.py sample TOKENIZER_DIR

`sync`: a tiny llama policy under DeepSpeed (ZeRO stage, LoRA rank) and a vLLM engine
fed from it: greedy tokens of both engines equal, then after optimizer updates the
stale engine differs and the synced one is equal again. Each rank draws its own
prompts. Prints `VLLM_SYNC_OK rank=R` on each rank that passes.

`sample`: one prompt, many sampled first tokens with temperature/top-k/top-p; prints
the empirical frequencies and the distribution the settings describe, computed from
the training engine's logits (as JSON after `VLLM_SAMPLE`).
"""

import json
import sys

import torch

from rlhf.backbone import Backbone
from rlhf.config import DeepSpeedConfig, LoraConfig, ModelConfig, OptimConfig, RolloutConfig, TokenizerConfig
from rlhf.models import apply_lora, load_causal_lm, load_tokenizer, response_stop_ids
from rlhf.rollout import HFEngine, full_sequence, response_logprobs
from rlhf.rollout.vllm import VLLMEngine

# TINY_ARCHS' llama with heads of 32 (vLLM's CPU attention takes head sizes >= 32); tied
# embeddings (as the quickstart's) without LoRA, untied with it.
VLLM_ARCH = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256}
KV_CACHE_GB = 0.05  # ample for these models


def build(bb, tokenizer_dir, zero_stage, lora_r, lr=1e-2, rollout=None, tie=None):
    tokenizer = load_tokenizer(TokenizerConfig(path=tokenizer_dir))
    stop_ids = response_stop_ids(tokenizer, TokenizerConfig(path=tokenizer_dir))
    ds = DeepSpeedConfig(zero_stage=zero_stage)
    bb.seed_everything(0)
    with bb.model_init(ds):
        tie = lora_r == 0 if tie is None else tie
        policy = load_causal_lm(ModelConfig(arch={**VLLM_ARCH, "tie_word_embeddings": tie}, dropout=0.0), tokenizer)
    policy = apply_lora(policy, LoraConfig(r=lora_r, alpha=2 * lora_r, dropout=0.0), "CAUSAL_LM")
    if lora_r:
        # PEFT starts B at 0 (the merged weight is the base's): start it elsewhere, so the
        # merge is exercised from the first comparison on.
        with torch.no_grad(), bb.gathered([policy]):
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    engine = bb.wrap(policy, ds, OptimConfig(lr=lr), micro_batch_size=4, total_steps=100)
    cfg = rollout or RolloutConfig(max_new_tokens=8, engine="vllm")
    cfg.vllm.kv_cache_gb = KV_CACHE_GB
    return tokenizer, stop_ids, engine, cfg


def random_prompts(tokenizer, count, seed):
    g = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    rows = []
    for k in range(count):
        n = int(torch.randint(3, 9, (1,), generator=g))
        ids = [vocab[int(j)] for j in torch.randint(0, len(vocab), (n,), generator=g)]
        rows.append({"prompt_ids": ids, "prompt": tokenizer.decode(ids)})
    return rows


def same(a, b) -> bool:
    return all(torch.equal(x.cpu(), y.cpu()) for x, y in
               [(a.prompt_ids, b.prompt_ids), (a.prompt_mask, b.prompt_mask), (a.response_ids, b.response_ids),
                (a.action_mask, b.action_mask)])


def sync(tokenizer_dir, zero_stage, lora_r):
    bb = Backbone()
    tokenizer, stop_ids, policy, cfg = build(bb, tokenizer_dir, zero_stage, lora_r)
    hf = HFEngine(policy, cfg, tokenizer, zero_stage, stop_ids)
    vl = VLLMEngine(policy, cfg, tokenizer, bb, stop_ids, seed=0, max_model_len=64)
    prompts = random_prompts(tokenizer, 6, seed=100 + bb.rank)  # each rank its own prompts
    checks = {"equal_at_start": same(hf.generate(prompts, greedy=True), vl.generate(prompts, greedy=True))}
    sequences = [p["prompt_ids"] for p in prompts]
    checks["logprobs_at_start"] = vl.max_logprob_difference(policy, sequences)
    # Updates that move greedy decoding: maximise the likelihood of random responses.
    targets = random_prompts(tokenizer, 4, seed=7)
    for step in range(3):
        t = torch.tensor([p["prompt_ids"][:3] + q["prompt_ids"][:3] for p, q in zip(prompts, targets)])
        mask = torch.ones_like(t)
        loss = -response_logprobs(policy, t, mask, 3).mean()
        policy.backward(loss)
        bb.step(policy)
    after = hf.generate(prompts, greedy=True)
    checks["stale_differs"] = not same(after, vl.generate(prompts, greedy=True))
    checks["logprobs_stale"] = vl.max_logprob_difference(policy, sequences)
    vl.sync_weights(policy)
    checks["equal_after_sync"] = same(after, vl.generate(prompts, greedy=True))
    checks["logprobs_after_sync"] = vl.max_logprob_difference(policy, sequences)
    print(f"rank={bb.rank} checks={json.dumps(checks)}", flush=True)
    ok = (checks["equal_at_start"] and checks["stale_differs"] and checks["equal_after_sync"]
          and checks["logprobs_at_start"] < 1e-4 and checks["logprobs_after_sync"] < 1e-4
          and checks["logprobs_stale"] > 1e-2)
    if ok:
        print(f"VLLM_SYNC_OK rank={bb.rank}", flush=True)


def sample(tokenizer_dir):
    bb = Backbone()
    cfg = RolloutConfig(max_new_tokens=1, temperature=0.7, top_k=12, top_p=0.8, engine="vllm")
    # Untied, so that scaling the output layer peaks the distribution without touching the input.
    tokenizer, stop_ids, policy, cfg = build(bb, tokenizer_dir, 0, 0, rollout=cfg, tie=False)
    with torch.no_grad():  # a peaked toy distribution, so top-k and top-p both cut into it
        policy.module.lm_head.weight.mul_(12.0)
    vl = VLLMEngine(policy, cfg, tokenizer, bb, stop_ids, seed=0, max_model_len=64)
    prompt = random_prompts(tokenizer, 1, seed=3)
    n = 4000
    torch.manual_seed(1)
    rollout = vl.generate(prompt, n=n)
    counts = torch.bincount(rollout.response_ids[:, 0].cpu(), minlength=len(tokenizer)).tolist()
    ids = torch.tensor([prompt[0]["prompt_ids"]])
    with torch.no_grad():
        logits = policy.module(input_ids=ids).logits[0, -1].float()
    print("VLLM_SAMPLE " + json.dumps({"counts": counts, "logits": logits.tolist(),
                                       "pad": tokenizer.pad_token_id, "temperature": cfg.temperature,
                                       "top_k": cfg.top_k, "top_p": cfg.top_p}), flush=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    if args[0] == "sync":
        sync(args[1], int(args[2]), int(args[3]))
    else:
        sample(args[1])
