"""The `rlhf` command: one launcher for every stage, one GPU to many nodes.

    rlhf sft|rm|ppo CONFIG [key.sub=value ...] [--num-gpus N | --num-procs N]
                          [--hostfile F] [--no-ssh --node-rank R --master-addr A] [--dry-run]
    rlhf pipeline CONFIG [key=value ...] [--stages sft,rm,ppo] [launcher flags]

With one rank the stage runs in this process. With more, the command runs the
stage script (`launch/<stage>.py`) under the `deepspeed` launcher and prints the
exact command first, so it can be copied into a job script. The config is read and
validated here before anything starts.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

from rlhf.config import STAGES, ConfigError, check_batch_sizes, load_stage_config

CONFIG_CLASSES = {}


def config_class(stage: str):
    from rlhf.config import SFTConfig

    classes = {"sft": SFTConfig}
    try:
        from rlhf.config import RMConfig

        classes["rm"] = RMConfig
    except ImportError:
        pass
    try:
        from rlhf.config import PPOConfig

        classes["ppo"] = PPOConfig
    except ImportError:
        pass
    if stage not in classes:
        raise ConfigError(f"stage {stage!r} is not available in this version")
    return classes[stage]


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
    cmd += ["--master_port", str(args.master_port or _free_port())]
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


def launch_stage(stage: str, config: str, overrides: list[str], args: argparse.Namespace) -> int:
    world = planned_world_size(args)
    cfg_cls = config_class(stage)
    cfg = load_stage_config(cfg_cls, config, overrides)  # validation before anything runs
    check_batch_sizes(cfg, world)
    one_process = world == 1 and not args.hostfile and not args.no_ssh
    if one_process:
        cmd = [sys.executable, "-m", f"launch.{stage}", "--config", config, *overrides]
    else:
        cmd = launcher_command(stage, args, overrides, config)
    print("$ " + shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    if one_process:
        module = __import__(f"launch.{stage}", fromlist=["main"])
        return module.main(["--config", config, *overrides])
    env = dict(os.environ)
    if args.num_procs and "OMP_NUM_THREADS" not in env:
        # CPU ranks share the cores; without this each rank starts one thread per core.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (args.num_procs or 1)))
    return subprocess.call(cmd, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf", description="RLHF in three stages on DeepSpeed")
    sub = parser.add_subparsers(dest="command", required=True)
    for stage, text in [("sft", "supervised fine-tuning"), ("rm", "reward model on ranked pairs"),
                        ("ppo", "PPO against the reward model")]:
        p = sub.add_parser(stage, help=text)
        p.add_argument("config")
        p.add_argument("overrides", nargs="*", help="key.sub=value")
        add_launcher_args(p)
    args = parser.parse_args(argv)
    try:
        if args.command in STAGES:
            return launch_stage(args.command, args.config, args.overrides, args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
