"""SFT: rlhf's SFTTrainer against TRL's SFTTrainer, side by side.

Same random-init model directory, tokenizer, data (the built-in task's demonstrations,
prompt/completion with the loss on the completion only), batch size, steps, learning
rate schedule, AdamW settings, fp32 and no packing (unless --packing; --precision bf16
on a GPU, FlashAttention-2 there when installed). Each framework runs in its own
child process, alternately, `--repeats` times; medians are reported.

Measured: real (non-padding) training tokens per second, over the training loop only
(not model loading or tokenization); the child's peak RSS; and the final held-out loss
on the same rows, computed by one function for both (mean NLL of response tokens).

    python benchmarks/bench_sft.py --out benchmarks/results/sft_cpu.json

On a real model (`--model smollm2`: 24 steps of 8 rows of about 96 tokens, the task's
demonstrations joined, prompts in SmolLM2's chat template, lr 2e-5), a third child runs
the floor: the same micro-batches through the bare model (forward with the LM head on
the positions that predict a target, as ours, loss, backward, clipping, fused AdamW),
giving the floor's tokens/s and model GFLOP/s, and the 2048-square matmul's GFLOP/s:

    python benchmarks/bench_sft.py --model smollm2 --repeats 3 --out benchmarks/results/sft_smollm2_cpu.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from common import (arch_of, call_clock, compare, emit, floor_gflops, is_real, long_sft_rows, parent_args, prepare,
                    prepare_real, real_model_name, real_model_source, save, shape_defaults, step_times,
                    supervised_overrides, sync, table, timed, timed_ours, train_timer)


def heldout_loss(model_dir: str, tokenizer_dir: str, eval_file: str, max_length: int, device: str) -> float:
    """Mean NLL of the response tokens (EOS included) of the eval rows under the model."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf.config import DataConfig, TokenizerConfig
    from rlhf.data.batching import collate_sft
    from rlhf.data.formats import tokenize_sft
    from rlhf.data.sources import read_source
    from rlhf.config import SourceConfig
    from rlhf.losses import lm_loss
    from rlhf.models import load_tokenizer

    tok = load_tokenizer(TokenizerConfig(path=tokenizer_dir))
    examples, _ = tokenize_sft(read_source(SourceConfig(path=eval_file)), tok, DataConfig(max_length=max_length))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 64):
            b = collate_sft(examples[i:i + 64], tok.pad_token_id)
            logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
            total += lm_loss(logits, b["input_ids"].to(device), b["loss_mask"].to(device), 1.0).item()
            count += int(b["loss_mask"][:, 1:].sum())
    return total / count


def attention() -> str:
    """FlashAttention-2 on a GPU when the flash_attn package is installed, else sdpa (what
    our model.attn_implementation=auto picks; TRL is given the same)."""
    import torch
    from transformers.utils import is_flash_attn_2_available

    return "flash_attention_2" if torch.cuda.is_available() and is_flash_attn_2_available() else "sdpa"


def child_ours(spec: dict) -> None:
    from rlhf.config import SFTConfig, load_stage_config
    from rlhf.trainers.sft import SFTTrainer

    cfg = load_stage_config(SFTConfig, None, supervised_overrides(spec, spec["model"], spec["sft_train"]))
    trainer = SFTTrainer(cfg)
    trainer.setup()
    trainer.resume()
    tokens = sum(len(trainer.data.train[i]["input_ids"]) for s in range(trainer.total_steps)
                 for mb in trainer.sampler.step(s) for i in mb)
    seconds = call_clock(trainer, "train_step", spec)
    dt = timed_ours(spec, trainer)
    trainer.export(trainer.out / "final")
    emit({"tokens_per_s": tokens / dt, "train_s": dt, "tokens": tokens, "steps": trainer.total_steps,
          **step_times(seconds),
          "eval_loss": heldout_loss(str(trainer.out / "final"), spec["tokenizer"], spec["sft_eval"],
                                    spec["max_length"], spec["device"])})


def child_trl(spec: dict) -> None:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    out = Path(spec["work"]) / f"trl-{time.time_ns()}"
    ds = load_dataset("json", data_files=spec["sft_train"], split="train").rename_column("response", "completion")
    tok = AutoTokenizer.from_pretrained(spec["model"])
    bf16 = spec["precision"] == "bf16"
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32,
                                                 attn_implementation=spec["attention"])
    args = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
        num_train_epochs=spec["epochs"], learning_rate=spec["lr"], lr_scheduler_type="linear",
        warmup_steps=spec["warmup"], weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
        max_grad_norm=1.0, max_length=spec["max_length"], packing=spec.get("packing", False),
        completion_only_loss=True,
        logging_steps=spec["log_every"], save_strategy="no", eval_strategy="no", report_to=[],
        use_cpu=spec["device"] == "cpu", bf16=bf16, seed=spec["seed"], dataloader_drop_last=True,
        disable_tqdm=True)
    timer = train_timer(spec)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[timer])
    per_epoch = sum(len(x) for x in trainer.train_dataset["input_ids"])
    steps_per_epoch = len(trainer.train_dataset) // spec["batch"]
    tokens = per_epoch * steps_per_epoch * spec["batch"] / len(trainer.train_dataset) * spec["epochs"]
    trainer.train()
    trainer.save_model(str(out / "final"))
    emit({"tokens_per_s": tokens / timer.seconds, "train_s": timer.seconds, "tokens": tokens,
          **step_times(timer.step_seconds),
          "steps": steps_per_epoch * spec["epochs"],
          "eval_loss": heldout_loss(str(out / "final"), spec["tokenizer"], spec["sft_eval"], spec["max_length"],
                                    spec["device"])})


def child_floor(spec: dict) -> None:
    """Our trainer's micro-batches through the bare model: the floor of ours' tokens/s."""
    import torch
    from transformers import AutoModelForCausalLM

    from floor import adamw, floor_metrics, optimizer_step, param_split, stage_batches
    from rlhf.config import SFTConfig, load_stage_config
    from rlhf.data.batching import collate_sft
    from rlhf.losses import lm_loss
    from rlhf.trainers.base import setup_frozen
    from rlhf.trainers.sft import first_target

    cfg = load_stage_config(SFTConfig, None, supervised_overrides(spec, spec["model"], spec["sft_train"]))
    tok, steps = stage_batches("sft", cfg, collate_sft)
    # On a GPU the floor holds bf16 weights and optimizer states (no fp32 master copy):
    # a lower bound of what a bf16 step can cost.
    dev = spec["device"]
    dtype = torch.bfloat16 if spec["precision"] == "bf16" and dev != "cpu" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype,
                                                 attn_implementation=spec.get("attention", "sdpa")).to(dev).train()
    opt = adamw(model, spec["lr"])
    body, head = param_split(model)
    tokens, flops = 0, 0.0
    for b in (b for mbs in steps for b in mbs):
        B, T = b["input_ids"].shape
        tokens += int((b["input_ids"] != tok.pad_token_id).sum())  # packed rows have no attention mask
        flops += 6 * (body * B * T + head * B * (T - first_target(b["loss_mask"]) + 1))
    steps = [[{k: None if v is None else v.to(dev) for k, v in b.items()} for b in mbs] for mbs in steps]

    seconds = []

    def run() -> None:
        for micro_batches in steps:
            sync(spec)
            t0 = time.perf_counter()
            targets = sum(int(b["loss_mask"][:, 1:].sum()) for b in micro_batches)
            for b in micro_batches:
                start = first_target(b["loss_mask"]) - 1
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                               position_ids=b["position_ids"], use_cache=False,
                               logits_to_keep=b["input_ids"].shape[1] - start).logits
                lm_loss(logits, b["input_ids"][:, start:], b["loss_mask"][:, start:], targets).backward()
            optimizer_step(model, opt, 1.0)
            sync(spec)
            seconds.append(time.perf_counter() - t0)

    with setup_frozen():
        dt = timed(spec, run)
    emit({"tokens_per_s": tokens / dt, "train_s": dt, "tokens": tokens, "steps": len(steps),
          **step_times(seconds), **floor_metrics(flops, dt, dev)})


def main() -> None:
    p = parent_args(__doc__)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=None, help="rows per step (default 32 tiny, 8 real)")
    p.add_argument("--max-length", type=int, default=None, help="default 48 tiny, 128 real")
    p.add_argument("--lr", type=float, default=None, help="default 3e-3 tiny, 2e-5 real")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--long", type=int, default=None,
                   help="join this many demonstrations into each response (long sequences for GPUs; "
                        "default 0 tiny, 8 real)")
    p.add_argument("--rows", type=int, default=4000, help="training rows with --long (tiny model)")
    p.add_argument("--steps", type=int, default=24, help="steps on a real model (its training rows: steps x batch)")
    p.add_argument("--packing", action="store_true",
                   help="pack samples into max-length rows (ours: data.packing, padding-free with FlashAttention-2; "
                        "TRL: packing=True)")
    p.add_argument("--who", default=None,
                   help="children to run, comma-separated from ours,trl,floor (default ours,trl; and floor on a "
                        "real model)")
    args = p.parse_args()
    if args.child:
        spec = json.loads(args.spec)
        {"ours": child_ours, "trl": child_trl, "floor": child_floor}[args.child](spec)
        return
    import torch

    shape_defaults(args, tiny=dict(batch=32, max_length=48, lr=3e-3, long=0),
                   real=dict(batch=8, max_length=128, lr=2e-5, long=8))
    source = real_model_source(args)
    if source is not None:
        name = real_model_name(args)
        work = Path(args.work) / f"sft-{name}"
        spec = prepare_real(work, Path(args.work) / f"models-{name}", source, num_sft=args.steps * args.batch,
                            sft_join=args.long)
    else:
        work = Path(args.work) / (f"sft-h{args.hidden}-l{args.layers}-i{args.intermediate}"
                                  f"-p{max(256, args.max_length)}")
        spec = prepare(work, arch_of(args, max_positions=max(256, args.max_length)))
        if args.long:
            spec["sft_train"] = long_sft_rows(spec["sft_train"], work / f"long{args.long}_train.jsonl", args.rows,
                                              args.long)
            spec["sft_eval"] = long_sft_rows(spec["sft_eval"], work / f"long{args.long}_eval.jsonl", 100,
                                             args.long, 1)
    spec.update(work=str(work), epochs=args.epochs, batch=args.batch, max_length=args.max_length, lr=args.lr,
                warmup=10 if source is None else 2, log_every=50, seed=42, precision=args.precision,
                packing=args.packing, ours=args.ours + (["data.packing=true"] if args.packing else []),
                device="cuda" if torch.cuda.is_available() else "cpu", attention=attention())
    keys = ["tokens_per_s", "step_s", "first_step_s", "steps_sum_s", "train_s", "eval_loss", "gpu_peak_gb",
            "alloc_retries"]
    who = tuple(args.who.split(",")) if args.who else ("ours", "trl", "floor") if is_real(args) else ("ours", "trl")
    result = compare(__file__, spec, args.repeats, keys, who)
    if "floor" in who:
        keys += floor_gflops(result)
    # Model FLOPs utilisation: 6 x parameters x tokens (forward + backward), attention
    # score FLOPs not counted; against the dense bf16 peak of the GPU (H100 SXM: 989 TFLOP/s).
    if spec["device"] == "cuda":
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(spec["model"])).parameters())
        # mfu_steady: at the median step's pace (the first step's allocations and any
        # slow step left out), on the mean tokens of a step.
        for med in result["median"].values():
            tflops = 6 * n_params * med["tokens_per_s"] / 1e12
            med["model_tflops"] = tflops
            med["mfu_vs_989"] = tflops / 989
            med["mfu_steady"] = 6 * n_params * med["tokens"] / med["steps"] / med["step_s"] / 1e12 / 989
        result["params"] = n_params
        keys += ["model_tflops", "mfu_vs_989", "mfu_steady"]
    result["table"] = table(result, keys, "tokens_per_s")
    print(result["table"])
    save(result, args.out)


if __name__ == "__main__":
    main()
