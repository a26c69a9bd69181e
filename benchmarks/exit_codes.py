"""How often does a 2-rank run that succeeded exit "Aborted" (-6)? Before and after the fix.

    python benchmarks/exit_codes.py [--runs 40] [--without-teardown]
                                    [--out benchmarks/results/exit_codes.json]

Each run starts 2 ranks (no launcher) that do what every stage does last, collectives
through rlhf's Backbone, and then exit. Backbone destroys the process group at exit;
`--without-teardown` takes that away, as it was before: then a gloo worker thread may
release a finished collective's tensors while the interpreter finalizes, take the GIL
to do so, and abort the process ("terminate called without an active exception", exit
-6, shown by bash as 134) after a run that succeeded (pytorch/pytorch#179291, #190489).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(without_teardown: bool) -> None:
    import atexit

    import torch

    import rlhf.backbone
    from rlhf.backbone import Backbone

    bb = Backbone()
    if without_teardown:
        atexit.unregister(rlhf.backbone._destroy_process_group)
    for _ in range(20):
        bb.all_reduce(torch.ones(1000))
    bb.barrier()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--without-teardown", action="store_true")
    p.add_argument("--out", default=None, help="also write the result here (JSON)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.without_teardown)
        return
    failed = []
    for i in range(args.runs):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        cmd = [sys.executable, __file__, "--child"] + (["--without-teardown"] if args.without_teardown else [])
        procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for r in range(2)]
        results = [(proc.wait(timeout=300), proc.stderr.read()) for proc in procs]
        codes = [rc for rc, _ in results]
        if any(codes):
            failed.append({"run": i, "exit_codes": codes,
                           "aborted": any("terminate called" in err for _, err in results)})
            print(json.dumps(failed[-1]), flush=True)
    result = {"runs": args.runs, "without_teardown": args.without_teardown, "runs_with_a_failed_rank": len(failed),
              "failures": failed}
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
