"""`rlhf plan` against measured peaks: the tensor memory of real SFT, RM and PPO steps
on the CPU, counted by rlhf.memory.TensorMemory (every storage an operation creates,
alive until freed: what torch.cuda.max_memory_allocated reports on a GPU), against
the plan of the same config with `--device cpu`.

Each stage runs in a child process of its own: the trainer's setup (models, engines)
and two optimizer steps (PPO: one step, generation to the update) on batches at the
plan's shapes: rows of data.max_length tokens, every position a target (SFT); pairs of
full-length sequences sharing nothing (RM); prompts of max_prompt_length tokens and
responses that run to max_new_tokens (EOS held back with rollout.min_new_tokens).
The RM's and PPO's models are built from the shapes the plan reads (a pipeline's later
stages would load the earlier stages' outputs).

    python benchmarks/plan_vs_measured.py --config configs/quickstart.yaml --out results/plan_quickstart.json
    python benchmarks/plan_vs_measured.py --smollm2 --out results/plan_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOLLM2_SHAPE = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                 "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
                 "tie_word_embeddings": True, "rope_theta": 100000.0}
SMOLLM2_VOCAB = 49152


def smollm2_files(work: Path) -> str:
    """A multi-stage config of SmolLM2-135M's shape (random weights), a word-level
    tokenizer of its 49,152-entry vocabulary and a little data, written under `work`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    work.mkdir(parents=True, exist_ok=True)
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        vocab = {"<unk>": 0, "<|endoftext|>": 1, "<|pad|>": 2}
        vocab.update({f"w{i}": i for i in range(3, SMOLLM2_VOCAB)})
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                unk_token="<unk>").save_pretrained(tok_dir)
    words = lambda i, n: " ".join(f"w{3 + (i * 7 + j) % 1000}" for j in range(n))  # noqa: E731
    with open(work / "sft.jsonl", "w") as f:
        for i in range(64):
            f.write(json.dumps({"prompt": words(i, 8), "response": words(i + 1, 8)}) + "\n")
    with open(work / "pairs.jsonl", "w") as f:
        for i in range(64):
            f.write(json.dumps({"prompt": words(i, 8), "chosen": words(i + 1, 8), "rejected": words(i + 2, 8)}) + "\n")
    with open(work / "prompts.jsonl", "w") as f:
        for i in range(64):
            f.write(json.dumps({"prompt": words(i, 8)}) + "\n")
    cfg = {
        "output_dir": str(work / "run"), "seed": 0, "tokenizer": {"path": str(tok_dir)},
        "deepspeed": {"zero_stage": 0, "precision": "fp32"},
        "sft": {"model": {"arch": SMOLLM2_SHAPE, "dropout": 0.0}, "data": {"path": str(work / "sft.jsonl"),
                "max_length": 256}, "train": {"global_batch_size": 8, "micro_batch_size": 4, "max_steps": 2}},
        "rm": {"data": {"path": str(work / "pairs.jsonl"), "max_length": 256},
               "train": {"global_batch_size": 4, "micro_batch_size": 2, "max_steps": 2}},
        "ppo": {"data": {"path": str(work / "prompts.jsonl"), "max_length": 128, "max_prompt_length": 64},
                "rollout": {"batch_size": 8, "max_new_tokens": 64},
                "train": {"global_batch_size": 4, "micro_batch_size": 2, "max_steps": 1}},
    }
    import yaml

    path = work / "smollm2-shape.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def arch_overrides(config: str, root: str, stage: str) -> list[str]:
    """The models a stage loads from an earlier stage's output, built instead from the
    shapes the plan reads (randomly initialised: the outputs need not exist); PPO's
    responses run to max_new_tokens."""
    from rlhf.plan import World, load_configs, stage_outputs

    cfgs = load_configs(config, [f"output_dir={root}"], None, World(1, 1, "cpu"))
    outputs = stage_outputs(cfgs)
    out = []
    for key in {"sft": [], "rm": ["model"], "ppo": ["policy.model", "value.model", "reward.model"]}[stage]:
        m = cfgs[stage]
        for part in key.split("."):
            m = getattr(m, part)
        while m.arch is None and m.path is not None and Path(m.path).resolve() in outputs:
            m = outputs[Path(m.path).resolve()]
        if m.arch is not None:
            out += [f"{stage}.{key}.path=null", f"{stage}.{key}.arch={json.dumps(m.arch)}"]
    if stage == "ppo":
        out.append(f"ppo.rollout.min_new_tokens={cfgs['ppo'].rollout.max_new_tokens}")
    return out


def child(config: str, stage: str, overrides: list[str]) -> dict:
    """Plan one stage, then run its steps under the counter; both peaks."""
    import torch

    from rlhf.memory import TensorMemory
    from rlhf.plan import Planner, World, load_configs

    world = World(1, 1, "cpu")
    cfgs = load_configs(config, overrides, None, world)
    cfg = cfgs[stage]
    t0 = time.time()
    plan = Planner(cfgs, world).plan(stage)
    plan_s = time.time() - t0

    mem = TensorMemory("cpu")
    g = torch.Generator().manual_seed(0)
    with mem:
        trainer = {"sft": sft_trainer, "rm": rm_trainer, "ppo": ppo_trainer}[stage](cfg)
        trainer.setup()
        peaks = {"setup": mem.peak}
        V = len(trainer.tokenizer)
        if stage in ("sft", "rm"):
            T = cfg.data.max_length
            for _ in range(2):
                micro = []
                for _ in range(trainer.accumulation):
                    if stage == "sft":
                        ex = [{"input_ids": torch.randint(5, V - 1, (T,), generator=g).tolist(),
                               "loss_mask": [0] + [1] * (T - 1)} for _ in range(cfg.train.micro_batch_size)]
                    else:  # first tokens differ: nothing shared
                        ex = [{"chosen_ids": [5] + torch.randint(7, V - 1, (T - 1,), generator=g).tolist(),
                               "rejected_ids": [6] + torch.randint(7, V - 1, (T - 1,), generator=g).tolist(),
                               "margin": 0.0} for _ in range(cfg.train.micro_batch_size)]
                    micro.append(trainer.collate(ex))
                trainer.train_step(micro)
        else:
            P = cfg.data.max_prompt_length
            prompts = [{"prompt_ids": torch.randint(5, V - 1, (P,), generator=g).tolist(), "prompt": ""}
                       for _ in range(trainer.prompts_per_rank)]
            mem.reset_peak()
            exp = trainer.make_experience(prompts)
            assert exp.response_ids.shape[1] == cfg.rollout.max_new_tokens, exp.response_ids.shape
            exp.rewards = trainer.compute_rewards(exp)
            exp.advantages, exp.returns = trainer.compute_advantages(exp)
            peaks["experience"] = mem.peak
            mem.reset_peak()
            trainer.learn(exp)
            peaks["learn"] = mem.peak
    measured = max(mem.peak, *peaks.values())
    return {"stage": stage, "measured_peak": measured, "phase_peaks": peaks, "planned_peak": plan.peak,
            "ratio": plan.peak / measured, "plan_parts": {p.name: p.bytes for p in plan.parts},
            "plan_seconds": plan_s}


def sft_trainer(cfg):
    from rlhf.trainers.sft import SFTTrainer

    return SFTTrainer(cfg)


def rm_trainer(cfg):
    from rlhf.trainers.reward import RewardTrainer

    return RewardTrainer(cfg)


def ppo_trainer(cfg):
    from rlhf.trainers.ppo import PPOTrainer

    return PPOTrainer(cfg)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=None)
    p.add_argument("--smollm2", action="store_true", help="a SmolLM2-135M-shaped config (random weights)")
    p.add_argument("--work", default="/tmp/rlhf-plan")
    p.add_argument("--stages", default="sft,rm,ppo")
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None)
    p.add_argument("--overrides", default="[]")
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.config, args.child, json.loads(args.overrides))), flush=True)
        return
    config = smollm2_files(Path(args.work) / "smollm2") if args.smollm2 else args.config
    results = []
    for stage in args.stages.split(","):
        root = f"{args.work}/run-{stage}-{time.time_ns()}"
        overrides = [f"output_dir={root}"] + arch_overrides(config, root, stage)
        cmd = [sys.executable, __file__, "--config", config, "--child", stage, "--overrides", json.dumps(overrides)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            sys.stderr.write(out.stdout[-3000:] + out.stderr[-5000:])
            raise SystemExit(f"{stage}: the child failed (exit code {out.returncode})")
        r = json.loads(line[0][7:])
        results.append(r)
        print(f"{stage}: planned {r['planned_peak'] / 1e6:.1f} MB, measured {r['measured_peak'] / 1e6:.1f} MB "
              f"(plan / measured {r['ratio']:.3f}; plan took {r['plan_seconds']:.1f} s)", flush=True)
        if args.out:  # after each stage: a later stage's failure keeps the earlier ones
            Path(args.out).write_text(json.dumps({"config": config, "results": results}, indent=1))


if __name__ == "__main__":
    main()
