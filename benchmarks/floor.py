"""The floor of a benchmark on a real model: the model passes a stage makes, as bare
torch calls on the same batches (no trainer, no DeepSpeed engine), run as one more child
of the benchmark (`--child floor`), in turn with the frameworks; and this machine's
dense fp32 matmul speed, measured in that child too.

Model FLOPs: 2 x parameters per position for a forward pass, 6 x for forward and
backward (attention scores not counted). The transformer body's parameters count at
every position it runs; the LM head's (vocabulary x hidden) only at the positions
whose logits are computed (our trainers skip the head where nothing is predicted, and
the floor makes the same calls); the input embedding is a lookup and counts nothing.
"""

from __future__ import annotations

import time

import torch


def matmul_gflops(n: int = 2048, reps: int = 12, device: str = "cpu") -> float:
    """GFLOP/s of an `n` x `n` matmul after a warm-up: fp32 on this process's CPU threads;
    bf16 and 8192-square on a GPU (its dense peak's regime)."""
    dtype = torch.float32
    if device != "cpu":
        n, reps, dtype = 8192, 20, torch.bfloat16
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device != "cpu":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device != "cpu":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def param_split(model: torch.nn.Module) -> tuple[int, int]:
    """(body, head) parameter counts of a causal LM or scalar-head model (see the module
    docstring): a head tied to the input embedding counts once, as the head."""
    from rlhf.models import unwrap

    hf = unwrap(model.hf if hasattr(model, "hf") else model)
    total = sum(p.numel() for p in hf.parameters())  # a tied matrix is one parameter
    embedding = hf.get_input_embeddings().weight
    out = hf.get_output_embeddings()
    if out is None:  # a scalar head: its few parameters stay in the body's count
        return total - embedding.numel(), 0
    tied = out.weight is embedding
    return total - embedding.numel() - (0 if tied else out.weight.numel()), out.weight.numel()


def adamw(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """torch's fused AdamW over the trainable parameters, with our engines' settings."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True)


def optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, max_grad_norm: float) -> None:
    """Clip the global gradient norm, step, drop the gradients: what a framework's
    optimizer step does beyond the passes."""
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)


def stage_batches(stage: str, cfg, collate, steps: int | None = None) -> tuple[object, list[list[dict]]]:
    """The tokenizer and, for each optimizer step, the collated micro-batches of rank 0 of
    one rank, made as our trainer makes them (same tokenization, order and padding)."""
    from rlhf.data import build_stage_data
    from rlhf.data.batching import StepSampler
    from rlhf.models import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer, cfg.primary_model())
    data = build_stage_data(stage, cfg.data, tok)
    if stage == "ppo":
        sampler = StepSampler(len(data.train), cfg.rollout.batch_size, cfg.rollout.batch_size, 1, 0, cfg.seed)
    else:
        sampler = StepSampler(len(data.train), cfg.train.global_batch_size, cfg.train.micro_batch_size, 1, 0,
                              cfg.seed)
    total = steps or cfg.train.max_steps or cfg.train.epochs * sampler.steps_per_epoch
    return tok, [[collate([data.train[i] for i in idx], tok.pad_token_id) for idx in sampler.step(s)]
                 for s in range(total)]


def floor_metrics(flops: float, seconds: float, device: str = "cpu") -> dict[str, float]:
    """The floor's model GFLOP/s and, in the same child, the reference matmul's."""
    gflops = flops / seconds / 1e9
    mm = matmul_gflops(device=device)
    return {"gflops": gflops, "flops": flops, "matmul_gflops": mm, "of_matmul": gflops / mm}
