"""The `rlhf` command: one launcher for every stage, one GPU to many nodes.

    rlhf sft|rm|ppo|grpo|rloo|reinforce|dpo CONFIG [key.sub=value ...] [--num-gpus N | --num-procs N]
                          [--hostfile F] [--no-ssh --node-rank R --master-addr A] [--dry-run]
    rlhf pipeline CONFIG [key=value ...] [--stages sft,rm,ppo | sft,rm,grpo | sft,grpo | sft,dpo] [launcher flags]
    rlhf plan CONFIG [key=value ...] [--num-gpus N] [--num-nodes M] [--gpu-memory-gb 80]

With one rank the stage runs in this process. With more, the command runs the
stage script (`launch/<stage>.py`) under the `deepspeed` launcher and prints the
exact command first, so it can be copied into a job script. The config is read and
validated here before anything starts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

from rlhf.config import ConfigError, check_batch_sizes, load_stage_config
from rlhf.model_source import check_model_source
from rlhf.stages import REGISTRY, STAGES, config_class


def add_launcher_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("launcher")
    g.add_argument("--num-gpus", type=int, default=None, help="accelerators (ranks) per node")
    g.add_argument("--num-procs", type=int, default=None,
                   help="ranks per node on a machine without GPUs (CPU ranks, gloo)")
    g.add_argument("--num-nodes", type=int, default=None, help="use the first N hosts of the hostfile")
    g.add_argument("--hostfile", default=None, help="DeepSpeed hostfile: one `host slots=N` line per node")
    g.add_argument("--master-addr", default=None, help="address of the rank-0 node")
    g.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: a free one)")
    g.add_argument("--no-ssh", action="store_true",
                   help="start only this node's ranks (one launcher per node, e.g. under SLURM's srun)")
    g.add_argument("--node-rank", type=int, default=None, help="this node's index, with --no-ssh")
    g.add_argument("--dry-run", action="store_true", help="validate the config, print the command, run nothing")


def hostfile_slots(path: str, num_nodes: int | None) -> list[int]:
    """Slots per host of a DeepSpeed hostfile (`host slots=N`), first `num_nodes` hosts."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--hostfile: no such file {path}")
    slots = []
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        try:
            n = int(parts[1].split("=", 1)[1]) if len(parts) > 1 and parts[1].startswith("slots=") else None
        except ValueError:
            n = None
        if n is None or n < 1:
            raise ConfigError(f"{path}:{lineno}: expected `hostname slots=N`, got {line!r}")
        slots.append(n)
    if not slots:
        raise ConfigError(f"{path}: no hosts listed")
    return slots[:num_nodes] if num_nodes else slots


def planned_world_size(args: argparse.Namespace) -> int:
    per_node = args.num_gpus or args.num_procs
    if args.hostfile:
        slots = hostfile_slots(args.hostfile, args.num_nodes)
        return sum(min(s, per_node) if per_node else s for s in slots)
    nodes = args.num_nodes or 1
    return (per_node or 1) * nodes


def launcher_command(stage: str, args: argparse.Namespace, overrides: list[str], config: str) -> list[str]:
    """The `deepspeed` launcher command that runs `launch/<stage>.py` on every rank."""
    import launch

    script = Path(launch.__file__).parent / f"{stage}.py"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    per_node = args.num_gpus or args.num_procs
    if per_node:
        cmd += ["--num_gpus", str(per_node)]
    if args.hostfile:
        cmd += ["--hostfile", args.hostfile]
    if args.num_nodes:
        cmd += ["--num_nodes", str(args.num_nodes)]
    if args.master_addr:
        cmd += ["--master_addr", args.master_addr]
    # Several nodes must agree on the port: DeepSpeed's default unless given. One node
    # takes a free port, so that two jobs on one machine do not collide.
    multi_node = bool(args.hostfile or args.no_ssh)
    cmd += ["--master_port", str(args.master_port or (29500 if multi_node else _free_port()))]
    if args.no_ssh:
        if args.node_rank is None:
            raise ConfigError("--no-ssh needs --node-rank (and --master-addr for more than one node)")
        cmd += ["--no_ssh", "--node_rank", str(args.node_rank)]
    cmd += [str(script), "--config", config, *overrides]
    return cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def stage_command(stage: str, config: str, overrides: list[str], args: argparse.Namespace) -> tuple[list[str], bool]:
    """The command that runs one stage, and whether it runs in this process (one rank)."""
    one_process = planned_world_size(args) == 1 and not args.hostfile and not args.no_ssh
    if one_process:
        return [sys.executable, "-m", f"launch.{stage}", "--config", config, *overrides], True
    return launcher_command(stage, args, overrides, config), False


def launch_stage(stage: str, config: str, overrides: list[str], args: argparse.Namespace) -> int:
    cfg = load_stage_config(config_class(stage), config, overrides)  # validation before anything runs
    check_batch_sizes(cfg, planned_world_size(args))
    for key, model_cfg in cfg.models().items():
        check_model_source(model_cfg, key)
    cmd, one_process = stage_command(stage, config, overrides, args)
    print("$ " + shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    if one_process:
        module = __import__(f"launch.{stage}", fromlist=["main"])
        return module.main(["--config", config, *overrides])
    env = dict(os.environ)
    # The ranks import the rlhf this launcher runs (a checkout used in place would
    # otherwise give them whichever rlhf is installed).
    import launch

    root = str(Path(launch.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if args.num_procs and "OMP_NUM_THREADS" not in env:
        # CPU ranks share the cores; without this each rank starts one thread per core.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (args.num_procs or 1)))
    return run_launcher(cmd, env)


def run_launcher(cmd: list[str], env: dict[str, str]) -> int:
    """Run the `deepspeed` launcher and return its exit code, passing a stop signal on
    to every rank of this node so that they all write their checkpoint.

    The launcher is two processes, runner.py and launch.py, and neither forwards
    SIGUSR1: its default action would kill them and orphan the ranks. So they start
    with SIGUSR1 ignored (inherited across exec); SIGTERM makes launch.py SIGTERM the
    ranks, then SIGKILL them 30 s later. A SIGTERM or SIGUSR1 to this process (the
    one a scheduler or a terminal signals) reaches each rank as SIGUSR1; this process
    then waits for the ranks themselves, which may outlive a launcher killed by the
    same signal, and returns EXIT_PREEMPTED. (With `--hostfile` over ssh, the other
    nodes' ranks are out of reach: there, signal each node's `rlhf`, as SLURM does.)
    """
    import psutil

    from launch.common import EXIT_PREEMPTED

    default_usr1 = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        proc = subprocess.Popen(cmd, env=env)
    finally:
        signal.signal(signal.SIGUSR1, default_usr1)
    ranks: dict[int, psutil.Process] = {}  # the ranks told to stop
    asked = []

    def forward(signum=None, frame=None):
        if signum is not None:
            asked.append(signum)
        for p in rank_processes(proc.pid):
            ranks[p.pid] = p
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGUSR1)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        while True:
            try:
                rc = proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if asked:  # again: a rank that was still starting ignored it (it stops once)
                    forward()
        if asked:
            psutil.wait_procs(list(ranks.values()))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if asked and rc != 0:
        print(f"[rlhf] stopped by {signal.Signals(asked[0]).name} (exit {EXIT_PREEMPTED}): run the same command "
              "again to resume from the last checkpoint", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    return rc


def rank_processes(launcher_pid: int):
    """The ranks this node's launcher started: the children of DeepSpeed's launch.py."""
    import psutil

    try:
        procs = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for p in procs:
        try:
            if any("deepspeed.launcher.launch" in a for a in p.cmdline()):
                out += p.children()
        except psutil.Error:
            pass
    return out


def chat(args: argparse.Namespace) -> int:
    """Talk to a policy: `--prompt TEXT` answers once, otherwise read lines from stdin."""
    import torch

    from rlhf.evaluate import load_policy

    from rlhf.tokens import stop_token_ids

    model, tok = load_policy(args.model_dir)
    stops = stop_token_ids(tok, args.model_dir)
    use_template = tok.chat_template is not None and not args.raw
    history: list[dict[str, str]] = []

    def answer(text: str) -> str:
        if use_template:
            history.append({"role": "user", "content": text})
            prompt = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
            ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
        else:
            # Raw mode sends the line as typed, newline included (the quickstart's prompts end with one).
            ids = tok(text if text.endswith("\n") else text + "\n", return_tensors="pt")
        torch.manual_seed(args.seed)
        out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
                             temperature=None if args.greedy else args.temperature,
                             eos_token_id=stops, pad_token_id=tok.pad_token_id)
        reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        if use_template:
            history.append({"role": "assistant", "content": reply})
        return reply

    if args.prompt is not None:
        print(answer(args.prompt))
        return 0
    print(f"chatting with {args.model_dir} ({'chat template' if use_template else 'raw text'}); Ctrl-D to quit")
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if line.strip():
            print(answer(line))


def evaluate(args: argparse.Namespace) -> int:
    """Win rate and mean scores of a policy against a baseline on a prompt file."""
    import json

    from rlhf.config import DataConfig
    from rlhf.data.formats import tokenize_prompts
    from rlhf.data.sources import load_rows
    from rlhf.evaluate import Sampling, compare_policies
    from rlhf.models import load_tokenizer
    from rlhf.config import TokenizerConfig

    data_cfg = DataConfig(path=args.prompts, max_length=10**6, max_prompt_length=10**6 - 1)
    rows, _ = load_rows(data_cfg, 2)
    examples, _ = tokenize_prompts(rows, load_tokenizer(TokenizerConfig(path=args.policy)), data_cfg)
    examples = examples[: args.limit]
    gold = None
    if args.task_gold:
        from rlhf.task import gold_function

        gold = gold_function(args.task_gold)
    result = compare_policies(args.policy, args.baseline, args.reward_model, [e["prompt"] for e in examples],
                              Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       seed=args.seed), gold=gold, prompt_ids=[e["prompt_ids"] for e in examples])
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf", description="RLHF in three stages on DeepSpeed")
    sub = parser.add_subparsers(dest="command", required=True)
    for stage, info in REGISTRY.items():
        p = sub.add_parser(stage, help=info.help)
        p.add_argument("config")
        p.add_argument("overrides", nargs="*", help="key.sub=value (relative to the stage's section)")
        add_launcher_args(p)
    p = sub.add_parser("pipeline", help="SFT, then RM, then PPO, then a report")
    p.add_argument("config", help="a multi-stage config with sft:, rm: and ppo: sections")
    p.add_argument("overrides", nargs="*", help="key=value (shared) or stage.key=value")
    p.add_argument("--stages", default="sft,rm,ppo",
                   help="run these stages in order, e.g. rm,ppo, sft,rm,grpo, sft,grpo (a function reward) or sft,dpo")
    add_launcher_args(p)
    p = sub.add_parser("plan", help="per-GPU memory of each stage of a config, before launch")
    p.add_argument("config", help="a single-stage (with --stages) or multi-stage config")
    p.add_argument("overrides", nargs="*", help="key=value (shared) or stage.key=value; relative for one stage")
    p.add_argument("--num-gpus", type=int, default=None, help="GPUs per node")
    p.add_argument("--num-nodes", type=int, default=None, help="nodes")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU, GB (1e9 bytes)")
    p.add_argument("--stages", default=None, help="plan only these stages, e.g. sft,ppo")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda: fused attention kernels (FlashAttention, sdpa); cpu: the CPU's kernels")
    p = sub.add_parser("chat", help="talk to a trained policy")
    p.add_argument("model_dir")
    p.add_argument("--prompt", default=None, help="answer this once and exit")
    p.add_argument("--raw", action="store_true", help="send text as typed, even if the tokenizer has a chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("eval", help="win rate of a policy over a baseline, judged by a reward model")
    p.add_argument("--policy", required=True)
    p.add_argument("--baseline", required=True)
    p.add_argument("--reward-model", required=True)
    p.add_argument("--prompts", required=True, help="JSONL/JSON/Parquet file with a prompt per row")
    p.add_argument("--task-gold", nargs="?", const="describe", default=None, choices=["describe", "one_word"],
                   help="also judge by a built-in task's gold reward (describe when no task is named)")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON result here")
    # `key=value` overrides may stand anywhere, also after launcher flags.
    argv = list(sys.argv[1:] if argv is None else argv)
    takes_overrides = bool(argv) and argv[0] in (*STAGES, "pipeline", "plan")
    overrides = [a for a in argv[1:] if "=" in a and not a.startswith("-")] if takes_overrides else []
    args = parser.parse_args([a for a in argv if a not in overrides or a == argv[0]])
    if hasattr(args, "overrides"):
        args.overrides = overrides
    try:
        if args.command in STAGES:
            return launch_stage(args.command, args.config, args.overrides, args)
        if args.command == "pipeline":
            from rlhf.pipeline import run_pipeline

            stages = [s.strip() for s in args.stages.split(",") if s.strip()]
            unknown = [s for s in stages if s not in STAGES]
            if unknown:
                raise ConfigError(f"--stages: unknown stage {unknown[0]!r} (choose from {', '.join(STAGES)})")
            return run_pipeline(args.config, args.overrides, stages, args)
        if args.command == "plan":
            from rlhf.plan import main as plan

            return plan(args, args.overrides)
        if args.command == "chat":
            return chat(args)
        return evaluate(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
