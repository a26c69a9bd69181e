"""The one object that owns torch.distributed and DeepSpeed.

Trainers never call ``deepspeed`` or ``torch.distributed`` themselves: they ask
the backbone to wrap a model, step it, reduce metrics, save and load. The same
code runs on CUDA with NCCL and on the CPU with gloo (DeepSpeed's accelerator
abstraction picks the device and the backend).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import random
import re
import shutil
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from rlhf.config import DeepSpeedConfig, OptimConfig

# Importing deepspeed prints accelerator detection lines; keep them at warning level.
os.environ.setdefault("DS_ACCELERATOR_LOG_LEVEL", "warning")
import deepspeed  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402


def deepspeed_config(
    ds: DeepSpeedConfig,
    micro_batch_size: int,
    accumulation_steps: int,
    world_size: int,
    max_grad_norm: float = 0.0,
    trainable: bool = True,
    hidden_size: int | None = None,
) -> dict[str, Any]:
    """Build the DeepSpeed JSON for one engine from the typed config (the only place it is built).

    Frozen models (reference policy, reward model) get an inference config: ZeRO-3
    when asked (parameters stay partitioned), otherwise plain replication.

    Communication: on a GPU, gradient reduction overlaps the backward (`overlap_comm`);
    on the CPU it stays off (gloo gains nothing from it). With the model's
    `hidden_size`, buckets and ZeRO-3 thresholds follow the model's size as the Hugging
    Face integration's "auto" values do: reduce and all-gather buckets of h^2 elements,
    ZeRO-3 prefetch of 0.9 h^2, and parameters under 10 h elements kept whole on every
    rank (norms, biases: gathering them costs more than keeping them). Small buckets
    also bound the buffers `overlap_comm` holds (4.5x the bucket sizes). A gathered
    parameter stays for a reuse within 12 h^2 elements (about one transformer layer: a
    checkpointed layer's recompute and its backward): DeepSpeed's default, 1e9, makes
    each module's release scan the whole rest of the recorded trace, quadratic in the
    number of modules, which with LoRA's many small modules made the first ZeRO-3
    update of SmolLM2-135M take 29-48 s instead of 9 (RESULTS.md). Everything
    here can be overridden through `deepspeed.extra`.
    """
    stage = ds.zero_stage if trainable or ds.zero_stage == 3 else 0
    on_gpu = get_accelerator().device_name() != "cpu"
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update(overlap_comm=on_gpu, contiguous_gradients=True)
        if hidden_size:
            zero.update(reduce_bucket_size=hidden_size**2, allgather_bucket_size=hidden_size**2)
    if ds.offload_optimizer and trainable:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_params and stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if stage == 3:
        # Export gathers the shards itself (Backbone.full_state_dict); no 16-bit copy is needed.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        if hidden_size:
            zero.update(stage3_prefetch_bucket_size=int(0.9 * hidden_size**2),
                        stage3_param_persistence_threshold=10 * hidden_size,
                        stage3_max_reuse_distance=12 * hidden_size**2)
        if ds.zero_hpz_partition_size > 1:
            if world_size % ds.zero_hpz_partition_size:
                raise ValueError(f"deepspeed.zero_hpz_partition_size={ds.zero_hpz_partition_size} must divide the "
                                 f"number of ranks ({world_size})")
            zero["zero_hpz_partition_size"] = ds.zero_hpz_partition_size
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "train_batch_size": micro_batch_size * accumulation_steps * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # We hand DeepSpeed a torch AdamW (fused on CUDA); it is tested with ZeRO.
        "zero_allow_untested_optimizer": True,
    }
    if trainable and max_grad_norm > 0:
        cfg["gradient_clipping"] = max_grad_norm
    if trainable and ds.precision == "bf16" and stage == 1:
        # Accumulate gradients in fp32 (DeepSpeed's BF16 optimizer): bf16 gradient
        # accumulation loses the small updates that fp32 training keeps.
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return _deep_update(cfg, ds.extra)


def hidden_size_of(model: torch.nn.Module) -> int | None:
    """The hidden size in the config of the (first) Hugging Face model inside `model`
    (under PEFT or our ScalarModel wrapper), the largest for models that list several."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        for c in (cfg, getattr(cfg, "text_config", None)):
            if isinstance(getattr(c, "hidden_size", None), int):
                return c.hidden_size
            if getattr(c, "hidden_sizes", None):
                return max(c.hidden_sizes)
    return None


def _deep_update(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def shm_buffer_path(rank: int) -> Path:
    """Where DeepSpeed's CPU all-reduce keeps rank `rank`'s 66 MB shared-memory buffer
    (ops/csrc/cpu/comm/shm.cpp: named from the uid, MASTER_ADDR, MASTER_PORT and rank)."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def _unlink_shm_buffers() -> None:
    """Remove this rank's shared-memory buffer from /dev/shm once every rank has mapped it.

    DeepSpeed never unlinks these files: every CPU run of several ranks on a node left
    66 MB per rank in RAM-backed /dev/shm, a killed or preempted run too (4.4 GB after a
    day of tests filled this machine's memory). Each rank maps every rank's buffer while
    DeepSpeed starts; after the barrier all mappings exist, and an unlinked file lives on
    until the last of them goes, so nothing is left behind however the ranks end."""
    torch.distributed.barrier()
    with contextlib.suppress(OSError):
        shm_buffer_path(torch.distributed.get_rank()).unlink()


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        with contextlib.suppress(Exception):  # a peer may be gone: nothing left to tidy
            torch.distributed.destroy_process_group()


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 to /dev/null for the duration (C++ code writes there directly)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CUDA_ALLOCATOR = "expandable_segments:True"


def set_cuda_allocator(env: dict) -> None:
    """torch's CUDA allocator with expandable segments, unless `PYTORCH_CUDA_ALLOC_CONF`
    is already set (the user's value wins). Read when CUDA first allocates, so set before.

    Training steps change shape (packed rows, rollouts of new lengths); with fixed
    segments each new, larger shape made the allocator reserve fresh segments, and on an
    H100 a few steps of a 1B SFT run took 2 s instead of 0.35 (the run 1.42x slower;
    benchmarks/RESULTS.md, "H100, 1.0B")."""
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOCATOR)


MALLOC_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_cpu_memory(env: dict) -> bool:
    """On glibc, serve large allocations from the heap and keep freed memory in the
    process (mallopt: no mmap'd chunks, trim only above 2 GiB), unless the environment
    sets any of MALLOC_SETTINGS (the user's choice wins). Whether it was applied.

    By default glibc maps every buffer over 32 MB afresh and unmaps it when freed, so
    each training step pays page faults again for its large tensors (logits chunks,
    dense embedding gradients): a fresh 85 MB buffer cost 32 ms to touch on the
    development machine against 4 ms to refill an old one. SmolLM2-135M GRPO on 2
    CPU cores: 5-13% more episodes/s, 12-13% more peak RSS (benchmarks/RESULTS.md,
    GRPO, "Stop 24")."""
    import ctypes
    import ctypes.util

    if any(k in env for k in MALLOC_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc (musl, macOS): nothing to set
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


class Backbone:
    """Distributed state and the few verbs a trainer needs.

    Starts under the `deepspeed` launcher, under torchrun, or as one plain process
    (then it sets the rank variables itself, so no launcher is needed for one rank).
    """

    timeout_minutes = 30.0
    _main_only_calls = 0

    def __init__(self, timeout_minutes: float = 30.0) -> None:
        """`timeout_minutes`: how long a collective waits for the other ranks before it
        fails (a rank that died or stalls then ends the others instead of hanging them).
        Fixed when the process group starts: a second Backbone keeps the first's."""
        if torch.cuda.is_available():
            if not torch.cuda.is_initialized():
                set_cuda_allocator(os.environ)
        else:
            keep_freed_cpu_memory(os.environ)
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                              MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        self.accelerator = get_accelerator()
        if not torch.distributed.is_initialized():
            timeout = timedelta(minutes=timeout_minutes)
            # The groups DeepSpeed creates later (data parallel, ZeRO) take torch's default
            # timeout, not the world group's: make ours that default first.
            c10d = torch.distributed.distributed_c10d
            c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
            deepspeed.init_distributed(dist_backend=self.accelerator.communication_backend_name(),
                                       verbose=False, timeout=timeout)
            Backbone.timeout_minutes = timeout_minutes  # the process group's, for every Backbone
            if self.accelerator.device_name() == "cpu":  # DeepSpeed's shared-memory all-reduce
                _unlink_shm_buffers()
            # Destroyed while Python is whole: otherwise a gloo worker thread may drop the
            # last reference to a finished collective's tensors while the interpreter
            # finalizes, take the GIL to do so, and abort the process (exit -6) after a run
            # that succeeded (pytorch/pytorch#179291, #190489).
            atexit.register(_destroy_process_group)
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.accelerator.device_name() != "cpu":
            self.accelerator.set_device(self.local_rank)
        self.device = torch.device(self.accelerator.device_name(self.local_rank))
        self._grad_norms: dict[int, float] = {}  # id(engine) -> norm, where DeepSpeed computes none

    # ------------------------------------------------------------------ who am I

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    def barrier(self) -> None:
        torch.distributed.barrier()

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def main_first(self, fn: Callable[[], Any], local: bool = True) -> Any:
        """Run `fn` on the (node-local) main rank first, then on the others.

        For work that fills a cache (tokenization): the others then read it. If the
        main rank fails, every rank raises instead of hanging.
        """
        result = self.main_only(fn, local)
        if not (self.is_local_main if local else self.is_main):
            result = fn()
        self.barrier()
        return result

    def main_only(self, fn: Callable[[], Any], local: bool = False) -> Any:
        """Run `fn` on the main rank (of each node, with `local`) while the others wait;
        its result there, None elsewhere. They wait on the rendezvous store, not in a
        collective, so the collective timeout does not cut short a long `fn` (a large
        dataset tokenized, a checkpoint converted). If `fn` fails, every rank raises;
        if the store's host (rank 0) dies, the waiting ranks raise at once."""
        if self.world_size == 1:
            return fn()
        main = self.is_local_main if local else self.is_main
        key = f"rlhf/main_only/{Backbone._main_only_calls}/" + (f"node{self.rank - self.local_rank}" if local else "all")
        Backbone._main_only_calls += 1  # every rank makes the same calls, so keys agree
        store = torch.distributed.distributed_c10d._get_default_store()
        if main:
            try:
                result = fn()
            except Exception as e:
                store.set(key, f"{type(e).__name__}: {e}")
                raise
            store.set(key, "")
            return result
        store.wait([key], timedelta(days=7))
        error = store.get(key).decode()
        if error:
            raise RuntimeError(f"the main rank failed: {error}")
        return None

    # ------------------------------------------------------------------ seeding and RNG

    def seed_everything(self, seed: int) -> None:
        """The same seed on every rank: model init and data order must agree across ranks."""
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.accelerator.manual_seed_all(seed)

    def rng_state(self) -> dict[str, Any]:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if self.accelerator.device_name() != "cpu":
            state["device"] = self.accelerator.get_rng_state()
        return state

    def set_rng_state(self, state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "device" in state and self.accelerator.device_name() != "cpu":
            self.accelerator.set_rng_state(state["device"])

    @contextlib.contextmanager
    def fork_rng(self, seed: int):
        """Run a block with its own seeded RNG, leaving the training RNG streams untouched
        (evaluation must not change what training samples next)."""
        devices = [] if self.device.type == "cpu" else [self.device]
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.manual_seed(seed)
            yield

    # ------------------------------------------------------------------ engines

    @contextlib.contextmanager
    def model_init(self, ds: DeepSpeedConfig, trainable: bool = True):
        """Context for building or loading a model that will be wrapped with `ds`.

        Under ZeRO-3 transformers must know the DeepSpeed config while the model is
        created, so that each rank only ever holds its shard (a 70B model never
        materialises whole on one rank).
        """
        if ds.zero_stage != 3:
            yield
            return
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        hf_ds = HfDeepSpeedConfig(deepspeed_config(ds, 1, 1, self.world_size, trainable=trainable))
        try:
            yield hf_ds
        finally:
            unset_hf_deepspeed_config()
            del hf_ds

    def make_optimizer(self, model: torch.nn.Module, optim: OptimConfig, ds: DeepSpeedConfig):
        """AdamW without decay on biases and norms. torch's fused kernel on CUDA and CPU;
        DeepSpeed's CPU Adam when optimizer states are offloaded (it requires it)."""
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
        groups = [{"params": decay, "weight_decay": optim.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
        if ds.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        # One fused kernel for all parameters on CUDA and on the CPU (torch's CPU default
        # is a Python loop over parameters); foreach (multi-tensor) elsewhere.
        kwargs["fused" if self.device.type in ("cuda", "cpu") else "foreach"] = True
        return torch.optim.AdamW(groups, **kwargs)

    def wrap(
        self,
        model: torch.nn.Module,
        ds: DeepSpeedConfig,
        optim: OptimConfig | None = None,
        micro_batch_size: int = 1,
        accumulation_steps: int = 1,
        total_steps: int = 1,
    ):
        """Wrap `model` in a DeepSpeed engine. With `optim` it is trainable (AdamW and
        a warmup + decay schedule over `total_steps`); without it is frozen (eval)."""
        trainable = optim is not None
        cfg = deepspeed_config(ds, micro_batch_size, accumulation_steps, self.world_size,
                               optim.max_grad_norm if optim else 0.0, trainable, hidden_size_of(model))
        optimizer = scheduler = None
        if trainable:
            from transformers import get_scheduler

            optimizer = self.make_optimizer(model, optim, ds)
            warmup = optim.warmup_steps or int(optim.warmup_ratio * total_steps)
            scheduler = get_scheduler(optim.scheduler, optimizer, num_warmup_steps=warmup,
                                      num_training_steps=total_steps)
        else:
            model.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=cfg)
        if trainable and self.world_size == 1 and not engine.zero_optimization() and ds.precision == "fp32":
            # Nothing to reduce, yet DeepSpeed's all-reduce would copy every gradient into a
            # flat buffer, scale it by 1 and copy it back at each optimizer step: about 6%
            # of an SFT step of SmolLM2-135M on the CPU (benchmarks/bench_sft.py --model smollm2).
            engine.enable_backward_allreduce = False
        if not trainable:
            engine.eval()
        return engine

    def step(self, engine) -> None:
        """`engine.step()` after each micro-batch's backward (DeepSpeed steps the optimizer
        at accumulation boundaries only). At a boundary where DeepSpeed computes no
        gradient norm (no ZeRO optimizer: stage 0 with a torch optimizer), compute it here,
        before clipping, from the already averaged gradients: see `grad_norm`."""
        if engine.is_gradient_accumulation_boundary() and not engine.zero_optimization():
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).item() if grads else 0.0
            self._grad_norms[id(engine)] = norm
        engine.step()

    def grad_norm(self, engine) -> float:
        """The global gradient norm (before clipping) of the engine's last optimizer step;
        NaN before the first one."""
        norm = engine.get_global_grad_norm()
        if norm is None:
            norm = self._grad_norms.get(id(engine))
        return float(norm) if norm is not None else float("nan")

    # ------------------------------------------------------------------ collectives

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or mean, max, min) of a tensor over ranks; returns a new tensor on the device."""
        x = x.detach().to(self.device, torch.float64 if x.is_floating_point() else x.dtype).clone()
        ops = {"sum": torch.distributed.ReduceOp.SUM, "mean": torch.distributed.ReduceOp.SUM,
               "max": torch.distributed.ReduceOp.MAX, "min": torch.distributed.ReduceOp.MIN}
        torch.distributed.all_reduce(x, op=ops[op])
        return x / self.world_size if op == "mean" else x

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def collective_failure(self, error: BaseException, wait_s: float = 5.0) -> str | None:
        """A one-line account of `error` if it is a failed collective (a peer rank died,
        or stalled past the timeout), naming the ranks that no longer answer; None for
        any other error.

        The lost ranks are found through the rendezvous store: every rank that fails
        checks in there, and those that have not within `wait_s` are named. The store
        lives in rank 0's process, so when it is gone, rank 0 is."""
        text = str(error)
        if not (isinstance(error, torch.distributed.DistError) or "gloo" in text or "NCCL" in text):
            return None
        lost = "a peer rank"
        try:
            with _stderr_silenced():  # a store client whose server is gone logs a C++ stack trace
                missing = self._ranks_not_checked_in(wait_s)
            if missing:
                lost = "rank " + ", ".join(map(str, missing))
        except Exception:  # the store is unreachable: its host, rank 0, is gone
            if self.rank != 0:
                lost = "rank 0"
        # gloo's text is "[file.cc:line] what happened. Advice...": keep what happened.
        detail = re.sub(r"^\[[^\]]*\]\s*", "", text.strip().splitlines()[0] if text.strip() else "").split(". ")[0]
        return (f"rank {self.rank} lost {lost} (it died, or stalled longer than the collective timeout of "
                f"{self.timeout_minutes:g} min): {detail}")

    def _ranks_not_checked_in(self, wait_s: float) -> list[int]:
        store = torch.distributed.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=wait_s))
        store.set(f"rlhf/failed/{self.rank}", "1")
        keys = {r: f"rlhf/failed/{r}" for r in range(self.world_size)}
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not store.check(list(keys.values())):
            time.sleep(0.1)
        return [r for r, k in keys.items() if not store.check([k])]

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, engines: dict[str, Any], ckpt_root: Path, step: int,
                        trainer_state: dict[str, Any], keep_last: int,
                        rank_state: dict[str, Any] | None = None) -> Path:
        """Write a resumable checkpoint atomically: into a temporary directory, renamed
        to `step-N` only once every rank has written its files and flushed them to disk.
        A crash or kill -9 at any moment leaves the previous checkpoints intact and at
        most a temporary directory, which the next save removes. A checkpoint is deleted
        the same way: renamed out of `step-*` first, so a kill during the deletion never
        leaves a half-deleted `step-N`. At most `keep_last + 1` checkpoints exist at any
        moment, the temporary one included."""
        final = ckpt_root / f"step-{step:08d}"
        tmp = ckpt_root / f".tmp-step-{step:08d}"
        if self.is_main:
            for stale in [*ckpt_root.glob(".tmp-step-*"), *ckpt_root.glob(".deleting-step-*")]:
                shutil.rmtree(stale, ignore_errors=True)  # left by a save or deletion that was killed
            tmp.mkdir(parents=True)
        self.barrier()
        for name, engine in engines.items():
            engine.save_checkpoint(str(tmp), tag=name, save_latest=False)
        # Per-rank state: RNG streams (sampling differs per rank) and e.g. EMA shards.
        torch.save({"rng": self.rng_state(), **(rank_state or {})}, tmp / f"rank{self.rank}.pt")
        if self.is_main:
            state = {**trainer_state, "world_size": self.world_size}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        # Each rank flushes what it wrote (on a shared filesystem its node's cache holds
        # it), so that a node that dies after the rename leaves no hole in the checkpoint.
        _fsync_tree(tmp)
        self.barrier()
        if self.is_main:
            replace_dir(tmp, final)
            for old in list_checkpoints(ckpt_root)[:-keep_last]:
                remove_dir(old)
        self.barrier()
        return final

    def load_checkpoint(self, engines: dict[str, Any], ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore engines (model, optimizer, scheduler) and this rank's RNG.

        A checkpoint written by another number of ranks loads too. ZeRO 1-3 split the
        optimizer states by rank, so rank 0 first converts such a checkpoint, once, to
        DeepSpeed's universal format (into `ckpt/universal/`), which any number of ranks
        loads; ZeRO-0 states are whole in every checkpoint.

        Returns the trainer state (with `world_size`, the writers' number of ranks) and
        this rank's extra state (empty when that number differs from ours)."""
        if not (ckpt / "trainer_state.json").exists():
            raise ValueError(f"{ckpt} is not a finished checkpoint (no trainer_state.json)")
        state = json.loads((ckpt / "trainer_state.json").read_text())
        state.setdefault("world_size", self.world_size)  # written before it was recorded
        same_layout = state["world_size"] == self.world_size
        for name, engine in engines.items():
            if same_layout or engine.zero_optimization_stage() == 0:
                path, _ = engine.load_checkpoint(str(ckpt), tag=name)
            else:
                path = self._load_universal(engine, ckpt, name)
            if path is None:
                raise RuntimeError(f"checkpoint {ckpt} has no state for the {name} model")
        rank_file = ckpt / f"rank{self.rank}.pt"
        rank_state: dict[str, Any] = {}
        if same_layout and rank_file.exists():
            rank_state = torch.load(rank_file, weights_only=False)
            self.set_rng_state(rank_state.pop("rng"))
        return state, rank_state

    def _load_universal(self, engine, ckpt: Path, tag: str) -> str | None:
        """Load engine `tag` of `ckpt` through its universal form, converting it first."""
        universal = ckpt / "universal"

        def convert() -> None:
            if (universal / tag).is_dir():
                return
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            tmp = ckpt / f".universal-tmp-{tag}"  # renamed when whole, like every checkpoint
            shutil.rmtree(tmp, ignore_errors=True)
            workers = max(1, min(8, (os.cpu_count() or 1) // 2))
            ds_to_universal(argparse.Namespace(
                input_folder=str(ckpt / tag), output_folder=str(tmp / tag), num_extract_workers=workers,
                num_merge_workers=workers, keep_temp_folder=False, strict=True,
                inject_missing_state=True))  # our checkpoints carry no Megatron layout info, none is needed
            _fsync_tree(tmp)
            universal.mkdir(exist_ok=True)
            os.replace(tmp / tag, universal / tag)
            _fsync(universal)
            shutil.rmtree(tmp)

        self.main_only(convert)
        engine._config.load_universal_checkpoint = True  # DeepSpeed reads its config flag at load time
        try:
            path, _ = engine.load_checkpoint(str(universal), tag=tag)
        finally:
            engine._config.load_universal_checkpoint = False
        # DeepSpeed 0.19.8's ZeRO-3 universal load hands all parameter groups one shared
        # `step` tensor, which torch's AdamW then advances once per group per step (so the
        # bias correction runs ahead, and the run drifts): give each group its own.
        for st in engine.optimizer.optimizer.state.values() if engine.optimizer is not None else []:
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()
        return path

    # ------------------------------------------------------------------ export

    def full_state_dict(self, engine) -> dict[str, torch.Tensor] | None:
        """The whole state dict of a DeepSpeed engine's model (or a plain module) on the
        main rank (None elsewhere), gathering ZeRO-3 shards.

        Parameters are gathered one at a time so the peak extra memory is one tensor.
        """
        module = getattr(engine, "module", engine)
        if hasattr(engine, "empty_partition_cache"):
            # ZeRO-3's prefetcher can leave a parameter in flight after the last forward
            # (an evaluation's); wait for it and release everything before gathering.
            engine.empty_partition_cache()
        out: dict[str, torch.Tensor] = {}
        for name, p in module.named_parameters():
            if hasattr(p, "ds_id"):  # a ZeRO-3 partitioned parameter
                with deepspeed.zero.GatheredParameters([p]):
                    if self.is_main:
                        out[name] = p.detach().to("cpu", copy=True)
            elif self.is_main:
                out[name] = p.detach().to("cpu", copy=True)
        if self.is_main:
            # The state dict also names tied parameters under their second name (a tied
            # LM head: named_parameters() yields the embedding only): take the gathered
            # copy, not the ZeRO-3 placeholder. Then buffers.
            names = {id(p): name for name, p in module.named_parameters()}
            for name, t in module.state_dict(keep_vars=True).items():
                if name not in out:
                    out[name] = out[names[id(t)]] if id(t) in names else t.detach().to("cpu", copy=True)
            return out
        return None

    def gathered(self, modules: Iterable[torch.nn.Module]):
        """Gather every ZeRO-3 parameter of `modules` for the duration of the context
        (e.g. one rollout batch of generation); a no-op for other stages."""
        params = [p for m in modules for p in m.parameters() if hasattr(p, "ds_id")]
        if not params:
            return contextlib.nullcontext()
        return deepspeed.zero.GatheredParameters(params)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root`."""
    for dirpath, _, names in os.walk(root):
        for name in names:
            _fsync(os.path.join(dirpath, name))
        _fsync(dirpath)


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_dir(path: Path) -> None:
    """Delete a directory so that it is whole or gone at every moment: one atomic rename
    to `.deleting-<name>`, then the files (a kill during those leaves that directory,
    which the next `remove_dir` or `replace_dir` of the same name removes; checkpoint
    saves also sweep `.deleting-step-*`)."""
    doomed = path.with_name(".deleting-" + path.name)
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    _fsync(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def replace_dir(src: Path, dst: Path) -> None:
    """Put directory `src` in `dst`'s place: an existing `dst` is renamed away first and
    deleted after, so that a kill at any moment leaves `dst` whole (old or new) or
    absent, never half-deleted."""
    doomed = dst.with_name(".deleting-" + dst.name)
    shutil.rmtree(doomed, ignore_errors=True)
    if dst.exists():
        os.replace(dst, doomed)
    os.replace(src, dst)
    _fsync(dst.parent)  # the renames themselves
    shutil.rmtree(doomed, ignore_errors=True)


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary directories are not finished)."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step-"))
