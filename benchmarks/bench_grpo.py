"""GRPO: rlhf's GRPOTrainer against TRL 1.12's `trl.GRPOTrainer`, side by side.

Same starting policy, prompts, group size, prompts per step, response length, sampling
(temperature 1, no top-k/top-p), learning rate and schedule (linear, no warmup), AdamW
settings, clipping (0.2 both sides), loss aggregation, KL setting and precision (fp32
unless --precision bf16), and the same reward: the task's gold reward as a Python
function (ours `reward.function`, TRL's `reward_funcs`), so no reward model runs. One
optimizer step per rollout batch (TRL: gradient_accumulation_steps = rows / micro-batch,
steps_per_generation the same, one iteration), the advantage (r - group mean) / (group
std + 1e-4) on both (TRL's scale_rewards="group"). The KL to the reference, when --beta
> 0, is k3 in the loss on both (TRL's only form; ours `grpo.kl_in=loss`). Each framework
runs in its own child process, alternately; medians are reported.

Updating once per rollout, both take the "old" log-probs as the update's own, detached,
and make no policy pass over the rollout (ours: OnPolicyTrainer.old_logprobs_from_update).
With `--ours rollout.shared_prefix=true`, ours also computes each prompt once per group of
G responses in the reference pass and the update (off by default: every row is `prompt +
response` on its own, as TRL's).

Measured: episodes (one sampled response each) per second over the training loop (ours:
`train()` after setup; TRL: its train-begin to train-end events, so model loading and
optimizer creation are left out on both), each step's split (generation; experience =
generation, the reference pass, the reward function, and ours' policy pass; learning =
the rest of the step), the mean response length, the child's peak RSS, and the held-out
gold reward of the trained policy (one response sampled per held-out prompt, fixed seed,
by one function for both), beside the starting policy's: the same speed only counts at
the same learning.

Tiny model (default): the quickstart's SFT policy (`rlhf pipeline configs/quickstart.yaml
--stages sft`, run once into --work), its task's prompts and tokenizer, the gold reward
`rlhf.task:gold_rewards`; 150 steps of 16 prompts x 8 responses (up to 24 new tokens),
micro-batches of 32, lr 2e-4, beta 0.04:

    python benchmarks/bench_grpo.py --repeats 5 --out benchmarks/results/grpo_cpu.json
    python benchmarks/bench_grpo.py --repeats 5 --ours rollout.logprobs_from_generation=true \
        --out benchmarks/results/grpo_cpu_genlogprobs.json

SmolLM2-135M-Instruct (`--model smollm2`, from the cached GGUF conversion as in
bench_ppo.py; `--policy DIR` starts from another checkpoint of it, e.g. an SFT'd one):
the `one_word` task's prompts rendered with its chat template, the gold reward
`rlhf.task_one_word:gold_rewards`; 3 steps of 8 prompts x 8 responses (up to 16 new
tokens), micro-batches of 16, lr 1e-6:

    python benchmarks/bench_grpo.py --model smollm2 --repeats 3 --out benchmarks/results/grpo_smollm2_cpu.json

A random-init body (`--body`, with --hidden/--layers/--heads/--intermediate/--kv-heads;
those size arguments are refused without it): a Llama-style model of that size made by
`common.prepare` (the describe task's tokenizer and prompts, as bench_ppo.py's), the gold
reward `rlhf.task:gold_rewards`, prompts of up to 24 tokens and max_length = 24 +
--response-length (the model's positions cover it). The held-out gold of a random policy
means nothing, so it is not measured (gold_start and gold_end are null in the JSON) and
no final policy is saved. On a GPU (cuda when available; `--precision bf16`: ours in
DeepSpeed bf16 with fp32 master weights, ZeRO-1; TRL with fp32 weights under bf16
autocast, as bench_ppo.py and bench_sft.py run it), the 1.0B body of gpu_run.sh:

    python benchmarks/bench_grpo.py --body --hidden 2048 --intermediate 8192 --layers 16 --heads 32 \
        --kv-heads 8 --prompts 16 --group 8 --micro 16 --response-length 256 --steps 4 --precision bf16 \
        --repeats 1 --out benchmarks/results/gpu/grpo_1b.json
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (ROOT, arch_of, call_clock, compare, emit, is_real, parent_args, precision_overrides, prepare,
                    prepare_real, real_model_name, real_model_source, save, shape_defaults, step_times, table,
                    timed_ours, train_timer)

# Our loss aggregation -> TRL's loss_type with the same normalisation of the summed token losses.
LOSS_TYPES = {"token_mean": "dapo", "seq_mean_token_mean": "grpo", "seq_sum_norm": "dr_grpo"}
REWARD_FUNCTIONS = {"describe": "rlhf.task:gold_rewards", "one_word": "rlhf.task_one_word:gold_rewards"}
# The model-size arguments (common.model_args), used only with --body.
SIZE_ARGS = ("hidden", "layers", "heads", "intermediate", "kv_heads")
BODY_PROMPT_LENGTH = 24  # the tiny path's (the quickstart's) data.max_prompt_length


def steady(seconds: list[float]) -> float:
    """The median over the steps after the first (see common.step_times)."""
    return statistics.median(seconds[1:] or seconds)


def emit_run(spec: dict, seconds: float, step_seconds: list[float], **extra) -> None:
    episodes = spec["steps"] * spec["prompts"] * spec["group"]
    emit({"episodes_per_s": episodes / seconds, "train_s": seconds, "episodes": episodes,
          **step_times(step_seconds), **extra})


def heldout_gold(model_dir: str, spec: dict) -> float:
    """Mean gold reward of one response sampled (seeded, the benchmark's temperature)
    per held-out prompt, by our sampler for both frameworks' policies: on the run's
    device, in bf16 on a GPU when the run is bf16 (fp32 otherwise)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf.config import RolloutConfig, TokenizerConfig
    from rlhf.data.batching import collate_prompts
    from rlhf.models import load_tokenizer
    from rlhf.rollout.hf import end_at_eos, sample_responses
    from rlhf.task import gold_function
    from rlhf.tokens import encode_prompt, stop_token_ids

    tok = load_tokenizer(TokenizerConfig(path=spec["tokenizer"]))
    stops = stop_token_ids(tok, spec["model"])
    device = spec["device"]
    dtype = torch.bfloat16 if spec["precision"] == "bf16" and device != "cpu" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    gold = gold_function(spec["task"])
    prompts = [json.loads(x)["prompt"] for x in Path(spec["prompts_eval"]).read_text().splitlines()]
    sampling = RolloutConfig(max_new_tokens=spec["response_length"], temperature=spec["temperature"])
    torch.manual_seed(1234)
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(prompts), 64):
            batch = collate_prompts([{"prompt_ids": encode_prompt(tok, p)} for p in prompts[i:i + 64]],
                                    tok.pad_token_id)
            ids, _ = sample_responses(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                      sampling, stops, tok.pad_token_id)
            ids, mask = end_at_eos(ids, stops, tok.pad_token_id)
            texts = [tok.decode(r[m.bool()].tolist(), skip_special_tokens=True) for r, m in zip(ids, mask)]
            total += sum(gold(p, t) for p, t in zip(prompts[i:i + 64], texts))
    return total / len(prompts)


def final_gold(final: Path, spec: dict) -> float:
    """`heldout_gold` of an exported policy, which is then deleted (SmolLM2: 0.5 GB a run)."""
    gold = heldout_gold(str(final), spec)
    shutil.rmtree(final)
    return gold


def ours_config(spec: dict):
    from rlhf.config import GRPOConfig, load_stage_config

    out = Path(spec["work"]) / f"ours-{time.time_ns()}"
    rows = spec["prompts"] * spec["group"]
    return load_stage_config(GRPOConfig, None, [
        f"output_dir={out}", f"tokenizer.path={spec['tokenizer']}", f"policy.model.path={spec['model']}",
        f"reward.function={REWARD_FUNCTIONS[spec['task']]}", f"data.path={spec['prompts_train']}",
        f"data.max_prompt_length={spec['max_prompt_length']}", f"data.max_length={spec['max_length']}",
        f"rollout.batch_size={spec['prompts']}", f"rollout.n={spec['group']}",
        f"rollout.max_new_tokens={spec['response_length']}", f"rollout.temperature={spec['temperature']}",
        f"train.global_batch_size={rows}", f"train.micro_batch_size={spec['micro']}",
        f"train.max_steps={spec['steps']}", "grpo.epochs=1", f"grpo.kl_coef={spec['beta']}", "grpo.kl_in=loss",
        "grpo.advantage=grpo", f"grpo.loss_aggregation={spec['loss']}", "grpo.clip_low=0.2", "grpo.clip_high=0.2",
        f"policy.optim.lr={spec['lr']}", "policy.optim.scheduler=linear", "policy.optim.warmup_steps=0",
        "policy.optim.weight_decay=0.0", "policy.optim.betas=[0.9, 0.95]", "policy.optim.max_grad_norm=1.0",
        *precision_overrides(spec["precision"]), "sample_every=0", "logging.progress_bar=false",
        f"seed={spec['seed']}", f"train.log_every={spec['steps']}", *spec.get("ours", [])])


def child_ours(spec: dict) -> None:
    from rlhf.trainers.algorithms import GRPOTrainer

    gold_start = heldout_gold(spec["model"], spec) if spec["gold"] else None
    trainer = GRPOTrainer(ours_config(spec))
    trainer.setup()
    trainer.resume()
    make_experience, lengths = trainer.make_experience, []

    def recording_lengths(prompts, *a, **k):
        exp = make_experience(prompts, *a, **k)
        lengths.append(exp.action_mask.sum(1).float().mean().item())
        return exp

    trainer.make_experience = recording_lengths
    generation = call_clock(trainer.engine, "generate", spec)
    experience, learn = call_clock(trainer, "make_experience", spec), call_clock(trainer, "learn", spec)
    seconds = timed_ours(spec, trainer)
    gold_end = None
    if spec["gold"]:
        trainer.export(trainer.out / "final")
        gold_end = final_gold(trainer.out / "final", spec)
    emit_run(spec, seconds, [a + b for a, b in zip(experience, learn)], gen_s=steady(generation),
             experience_s=steady(experience), learn_s=steady(learn), response_length=statistics.mean(lengths),
             gold_start=gold_start, gold_end=gold_end)


def trl_reward(task: str):
    """The task's gold reward in TRL's reward-function signature."""
    from rlhf.task import gold_function

    gold = gold_function(task)

    def gold_reward(prompts, completions, **_):
        return [gold(p, c) for p, c in zip(prompts, completions)]

    return gold_reward


def child_trl(spec: dict) -> None:
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    out = Path(spec["work"]) / f"trl-{time.time_ns()}"
    tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
    ds = load_dataset("json", data_files=spec["prompts_train"], split="train")
    ds = ds.remove_columns([c for c in ds.column_names if c != "prompt"])
    rows = spec["prompts"] * spec["group"]
    args = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=spec["micro"],
        gradient_accumulation_steps=rows // spec["micro"], num_generations=spec["group"], num_iterations=1,
        max_completion_length=spec["response_length"], temperature=spec["temperature"], top_k=0, top_p=1.0,
        beta=spec["beta"], epsilon=0.2, loss_type=LOSS_TYPES[spec["loss"]], scale_rewards="group",
        learning_rate=spec["lr"], lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, max_steps=spec["steps"], logging_steps=spec["steps"],
        save_strategy="no", report_to=[], use_cpu=spec["device"] == "cpu", bf16=spec["precision"] == "bf16",
        gradient_checkpointing=False, disable_dropout=True, seed=spec["seed"], disable_tqdm=True,
        # fp32 weights (bf16: under autocast, fp32 master weights as ours), as bench_ppo.py's TRL
        model_init_kwargs={"dtype": "float32"})
    timer = train_timer(spec)
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=[trl_reward(spec["task"])], args=args, train_dataset=ds,
                          processing_class=tok, callbacks=[timer])
    generation = call_clock(trainer, "_generate_single_turn", spec)
    score, experience, lengths = trainer._generate_and_score_completions, [], []

    def clocked(*a, **k):
        t0 = time.perf_counter()
        batch = score(*a, **k)
        experience.append(time.perf_counter() - t0)
        lengths.append(batch["completion_mask"].sum(1).float().mean().item())
        return batch

    trainer._generate_and_score_completions = clocked
    trainer.train()
    gold_end = None
    if spec["gold"]:
        trainer.save_model(str(out / "final"))
        gold_end = final_gold(out / "final", spec)
    emit_run(spec, timer.seconds, timer.step_seconds, gen_s=steady(generation), experience_s=steady(experience),
             learn_s=steady([s - e for s, e in zip(timer.step_seconds, experience)]),
             response_length=statistics.mean(lengths), gold_end=gold_end)


# ---------------------------------------------------------------- data and models


def prepare_tiny(work: Path) -> dict[str, str]:
    """The quickstart's SFT policy and task files, made once by our pipeline."""
    qs = work / "quickstart"
    if not (qs / "sft" / "final" / "config.json").exists():
        subprocess.run([sys.executable, "-m", "rlhf.cli", "pipeline", str(ROOT / "configs" / "quickstart.yaml"),
                        "--stages", "sft", f"output_dir={qs}"], cwd=ROOT, check=True)
    task = qs / "task"
    # The tokenizer as saved beside the policy (our loader's pad token), for both.
    return {"model": str(qs / "sft" / "final"), "tokenizer": str(qs / "sft" / "final"),
            "prompts_train": str(task / "prompts_train.jsonl"), "prompts_eval": str(task / "prompts_eval.jsonl"),
            "task": "describe"}


def prepare_body(args, max_positions: int) -> tuple[Path, dict[str, str]]:
    """A random-init Llama-style body of the --hidden/--layers/... size with the describe
    task's tokenizer and prompts (common.prepare, made once per size into --work)."""
    work = Path(args.work) / (f"grpo-body-h{args.hidden}-l{args.layers}-a{args.heads}-kv{args.kv_heads}"
                              f"-i{args.intermediate}-p{max_positions}")
    files = prepare(work, arch_of(args, max_positions), scalar=False)
    # The tokenizer as saved beside the policy (our loader's pad token), for both.
    return work, {"model": files["model"], "tokenizer": files["model"], "prompts_train": files["prompts_train"],
                  "prompts_eval": files["prompts_eval"], "task": "describe"}


def prepare_one_word(args, num_prompts: int, num_eval: int = 64) -> tuple[Path, dict[str, str]]:
    """A real chat model (as bench_ppo.py's) and the one_word task's prompts, rendered
    with its chat template into text that both frameworks tokenize alike."""
    from rlhf.config import TokenizerConfig
    from rlhf.models import load_tokenizer
    from rlhf.task import TaskConfig
    from rlhf.task_one_word import make_prompt_rows

    name = real_model_name(args)
    work = Path(args.work) / f"grpo-{name}"
    files = prepare_real(work, Path(args.work) / f"models-{name}", real_model_source(args))
    tok = load_tokenizer(TokenizerConfig(path=files["tokenizer"]))
    rng, system = random.Random(0), TaskConfig(name="one_word").system_prompt
    out = {}
    for split, rows in (("train", make_prompt_rows(num_prompts, rng, system)),
                        ("eval", make_prompt_rows(num_eval, rng, system, held_out=True))):
        path = work / f"one_word_prompts_{split}.jsonl"
        path.write_text("".join(json.dumps({"prompt": tok.apply_chat_template(r["prompt"], tokenize=False,
                                                                              add_generation_prompt=True)}) + "\n"
                                for r in rows))
        out[f"prompts_{split}"] = str(path)
    return work, {"model": files["model"], "tokenizer": files["tokenizer"], "task": "one_word", **out}


def main() -> None:
    p = parent_args(__doc__)
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps = rollout batches (default 150 tiny, 3 real)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per step (default 16 tiny, 8 real)")
    p.add_argument("--group", type=int, default=8, help="responses per prompt (GRPO's G; TRL's num_generations)")
    p.add_argument("--micro", type=int, default=None, help="rows per micro-batch (default 32 tiny, 16 real)")
    p.add_argument("--response-length", type=int, default=None, help="max new tokens (default 24 tiny, 16 real)")
    p.add_argument("--lr", type=float, default=None, help="default 2e-4 tiny, 1e-6 real")
    p.add_argument("--beta", type=float, default=0.04, help="k3 KL coefficient in the loss (0: no reference model)")
    p.add_argument("--loss", default="token_mean", choices=sorted(LOSS_TYPES),
                   help="our grpo.loss_aggregation; TRL's loss_type is its equal (token_mean: dapo)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--policy", default=None, help="start from this policy directory instead (same tokenizer)")
    p.add_argument("--body", action="store_true",
                   help="a random-init Llama-style policy of the --hidden/--layers/--heads/--intermediate/--kv-heads "
                        "size instead of the quickstart's SFT policy (no held-out gold)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = p.parse_args()
    if args.child:
        spec = json.loads(args.spec)
        {"ours": child_ours, "trl": child_trl}[args.child](spec)
        return
    import torch

    if args.body and is_real(args):
        p.error("--body is a random-init model: not with --model smollm2 or --model-path")
    if not args.body and any(getattr(args, k) != p.get_default(k) for k in SIZE_ARGS):
        p.error("the model-size arguments (--hidden, --layers, --heads, --intermediate, --kv-heads) need --body")
    shape_defaults(args, tiny=dict(steps=150, prompts=16, micro=32, response_length=24, lr=2e-4),
                   real=dict(steps=3, prompts=8, micro=16, response_length=16, lr=1e-6))
    if args.body:
        max_length = BODY_PROMPT_LENGTH + args.response_length
        work, spec = prepare_body(args, max_positions=max(256, max_length))
        spec.update(max_prompt_length=BODY_PROMPT_LENGTH, max_length=max_length)
    elif is_real(args):
        work, spec = prepare_one_word(args, num_prompts=max(args.steps * args.prompts, 64))
        spec.update(max_prompt_length=96, max_length=96 + args.response_length)
    else:
        work = Path(args.work) / "grpo-quickstart"
        spec = prepare_tiny(work)
        spec.update(max_prompt_length=24, max_length=64)  # the quickstart's grpo data settings
    if args.policy is not None:
        spec["model"] = args.policy
    spec.update(work=str(work), steps=args.steps, prompts=args.prompts, group=args.group, micro=args.micro,
                response_length=args.response_length, lr=args.lr, beta=args.beta, loss=args.loss,
                temperature=args.temperature, seed=42, ours=args.ours, precision=args.precision,
                gold=not args.body, device="cuda" if torch.cuda.is_available() else "cpu")
    keys = ["episodes_per_s", "step_s", "first_step_s", "experience_s", "gen_s", "learn_s", "train_s",
            "response_length", "gold_start", "gold_end"]
    result = compare(__file__, spec, args.repeats, keys)
    result["table"] = table(result, keys, "episodes_per_s")
    print(result["table"])
    save(result, args.out)


if __name__ == "__main__":
    main()
