"""The loop every stage shares, written once.

`Trainer.fit()` reads top to bottom:

    1. setup      - output directory checks, tokenizer, data, models, engines
    2. resume     - the latest checkpoint, if any (models, optimizers, RNG, step)
    3. train      - optimizer steps; each is `train_step(micro_batches)`, then
                    `end_step`: log, evaluate, checkpoint (every N steps, every M
                    minutes, or on SIGTERM/SIGUSR1, after which `fit` raises Preempted)
    4. finish     - final evaluation, checkpoint, Hugging Face export to final/

SFT and the reward model use `train` as it is and supply `build_models`,
`compute_loss` and `evaluate`; PPO replaces `train` with its own loop. A
researcher overrides one of the named steps, not the loop.
"""

from __future__ import annotations

import contextlib
import gc
import json
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch

from rlhf.backbone import Backbone, list_checkpoints, replace_dir
from rlhf.config import BaseStageConfig, dump, to_dict
from rlhf.data import StageData, build_stage_data
from rlhf.data.batching import StepSampler, eval_batches
from rlhf.metrics import MetricsWriter, plot_metrics
from rlhf.model_source import check_model_source, model_dir
from rlhf.models import load_tokenizer, response_stop_ids


class RunDirError(ValueError):
    """The output directory holds something we must not overwrite."""


class Preempted(Exception):
    """The run stopped on request (SIGTERM or SIGUSR1) after a checkpoint: running the
    same command again resumes it."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""How schedulers preempt: Kubernetes sends SIGTERM, SLURM `--signal=USR1@120` SIGUSR1."""


@contextlib.contextmanager
def setup_frozen():
    """Training with everything built so far (libraries, models, the dataset) set aside
    by Python's garbage collector: those objects live to the end of the stage, yet each
    full collection would walk them all (about 0.2 s for the 415k objects of the PPO
    benchmark's process; more with a large dataset held as Python lists). They are
    handed back afterwards, so a finished stage's models can still be collected."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class Trainer:
    stage = ""
    plot_keys: list[str] = []
    progress_keys: list[str] = ["train/loss", "train/tokens_per_s", "train/accuracy"]
    """Metrics shown on the progress bar."""

    def __init__(self, cfg: BaseStageConfig, backbone: Backbone | None = None):
        self.cfg = cfg
        self.backbone = backbone or Backbone(cfg.train.collective_timeout_minutes)
        self.out = Path(cfg.output_dir)
        self.step = 0
        self.total_steps = 0
        self.engines: dict[str, Any] = {}  # name -> trainable DeepSpeed engine (checkpointed)
        self.metrics: MetricsWriter | None = None
        self.stop_signal: int | None = None  # set by a stop signal on this rank
        self.last_checkpoint = time.monotonic()

    # ================================================================== the run

    def fit(self) -> dict[str, float]:
        """Run the stage to the end and return the final evaluation metrics; raise
        Preempted if a stop signal ended it early, with a checkpoint."""
        if self.is_finished():
            self.backbone.print(f"[{self.stage}] {self.out / 'final'} exists: this stage already finished")
            return self.final_metrics()
        with self.stop_signals():
            self.setup()
            self.resume()
            with setup_frozen():
                self.train()
            return self.finish()

    @contextlib.contextmanager
    def stop_signals(self):
        """While the stage runs, a stop signal (STOP_SIGNALS) asks it to stop: the current
        step finishes, every rank writes the checkpoint, and `fit` raises Preempted."""
        if threading.current_thread() is not threading.main_thread():
            yield  # Python delivers signals to the main thread only
            return

        def ask(signum, frame):
            self.stop_signal = signum

        previous = {s: signal.signal(s, ask) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def is_finished(self) -> bool:
        """A finished run of ours: final/ beside our config.yaml. A final/ without it
        belongs to something else, and setup refuses the directory."""
        return (self.cfg.checkpoint.resume == "auto" and (self.out / "final").is_dir()
                and (self.out / "config.yaml").is_file())

    # ------------------------------------------------------------------ 1. setup

    def setup(self) -> None:
        cfg, bb = self.cfg, self.backbone
        self.check_output_dir()
        bb.seed_everything(cfg.seed)
        if cfg.task is not None:
            from rlhf.task import materialize

            bb.main_first(lambda: materialize(cfg.task), local=False)
        bb.main_first(lambda: prepare_models(cfg))
        self.tokenizer = load_tokenizer(cfg.tokenizer, cfg.primary_model(), log=lambda m: bb.print(f"[{self.stage}] {m}"))
        self.stop_ids = response_stop_ids(self.tokenizer, cfg.tokenizer, cfg.primary_model())
        self.data = bb.main_first(lambda: build_stage_data(self.stage, cfg.data, self.tokenizer))
        bb.print(f"[{self.stage}] data: {self.data.summary}")
        self.accumulation = cfg.train.accumulation_steps(bb.world_size)
        self.sampler = self.make_sampler()
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.sampler.steps_per_epoch
        self.build_models()
        if bb.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump(cfg))
            bb.print(f"[{self.stage}] config:\n{dump(cfg)}")
            bb.print(f"[{self.stage}] {len(self.data.train)} train / {len(self.data.eval)} eval samples, "
                     f"{self.total_steps} steps of {cfg.train.global_batch_size} "
                     f"({bb.world_size} ranks x {cfg.train.micro_batch_size} x {self.accumulation} accumulation)")

    def check_output_dir(self) -> None:
        """Refuse to write into a directory that holds something else, or a finished
        run when asked to start afresh: nothing already written is lost."""
        out = self.out
        if not out.exists() or not any(out.iterdir()):
            return
        if not (out / "config.yaml").exists():
            raise RunDirError(f"output_dir {out} is not empty and is not an rlhf run directory; "
                              "choose a new output_dir")
        if self.cfg.checkpoint.resume == "never":
            raise RunDirError(f"output_dir {out} already holds a run and checkpoint.resume=never: "
                              "choose a new output_dir or use checkpoint.resume=auto to continue it")

    def make_sampler(self) -> StepSampler:
        """Which training samples each optimizer step takes on this rank."""
        t = self.cfg.train
        return StepSampler(len(self.data.train), t.global_batch_size, t.micro_batch_size,
                           self.backbone.world_size, self.backbone.rank, self.cfg.seed)

    def build_models(self) -> None:
        """Create the models and their engines (`self.engines` holds the trainable ones)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ 2. resume

    def resume(self) -> None:
        resume = self.cfg.checkpoint.resume
        if resume == "never":
            ckpt = None
        elif resume == "auto":
            found = list_checkpoints(self.out / "checkpoints")
            ckpt = found[-1] if found else None
        else:
            ckpt = Path(resume)
        if ckpt is not None:
            bb = self.backbone
            state, rank_state = bb.load_checkpoint(self.engines, ckpt)
            self.step = state["step"]
            if state["world_size"] != bb.world_size:
                # Another layout's per-rank RNG streams do not map onto ours: fresh ones,
                # drawn from the step, so that sampling does not replay the run's start.
                # (Step k's samples do not depend on the layout: see StepSampler.)
                torch.manual_seed((self.cfg.seed * 1_000_003 + self.step) * 1009 + bb.rank)
            self.load_state(state, rank_state)
            bb.print(f"[{self.stage}] resumed from {ckpt} at step {self.step}"
                     + (f" (written by {state['world_size']} ranks)" if state["world_size"] != bb.world_size else ""))
        if self.backbone.is_main:
            self.metrics = MetricsWriter(self.out, self.step, self.cfg.logging.tensorboard, self.cfg.logging.wandb,
                                         to_dict(self.cfg))
        self.last_checkpoint = time.monotonic()

    def state(self) -> dict[str, Any]:
        """Trainer state saved with each checkpoint, beyond models and optimizers (JSON)."""
        return {"step": self.step, "stage": self.stage}

    def rank_state(self) -> dict[str, Any]:
        """This rank's own state saved with each checkpoint (tensors allowed)."""
        return {}

    def load_state(self, state: dict[str, Any], rank_state: dict[str, Any]) -> None:
        """Restore what `state()` and `rank_state()` added (subclasses: KL controller, EMA)."""

    # ------------------------------------------------------------------ 3. train

    def train(self) -> None:
        """Optimizer steps until `total_steps`, with logging, evaluation and checkpoints."""
        if self.step == 0 and self.data.eval:
            self.log(self.evaluate())  # the starting point, so the curve shows what training did
        bar = self.progress_bar()
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            micro_batches = [self.collate([self.data.train[i] for i in idx])
                             for idx in self.sampler.step(self.step)]
            metrics = self.train_step(micro_batches)
            self.step += 1
            metrics["train/step_time_s"] = time.perf_counter() - t0
            metrics["train/epoch"] = self.step / self.sampler.steps_per_epoch
            self.end_step(metrics, bar)
        if bar is not None:
            bar.close()

    def end_step(self, metrics: dict[str, float], bar) -> None:
        """After `self.step` has advanced: log, evaluate and checkpoint at the configured
        intervals, move the progress bar, and stop here if a rank was asked to."""
        cfg = self.cfg
        if self.step % cfg.train.log_every == 0:
            self.log(metrics)
        if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < self.total_steps:
            self.log(self.evaluate())
        stop, due = self.agree_on_checkpoint()
        if stop or due or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
            self.save_checkpoint()
        self.update_progress(bar, metrics)
        if stop:
            if bar is not None:
                bar.close()
            self.backbone.print(f"[{self.stage}] stopped on request after step {self.step}, with a checkpoint; "
                                "run the same command again to resume")
            raise Preempted(f"stopped after step {self.step}")

    def agree_on_checkpoint(self) -> tuple[bool, bool]:
        """(stop, checkpoint due), the same on every rank, from one small all-reduce per
        step: a stop signal may have reached only some ranks, and whether
        checkpoint.every_minutes has passed is rank 0's clock."""
        minutes = self.cfg.checkpoint.every_minutes
        due = self.backbone.is_main and minutes > 0 and time.monotonic() - self.last_checkpoint >= 60 * minutes
        flags = self.backbone.all_reduce(torch.tensor([float(self.stop_signal is not None), float(due)]), "max")
        return bool(flags[0]), bool(flags[1])

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; returns metrics
        already reduced over ranks."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def eval_index_batches(self, n: int, size: int | None = None):
        """This rank's share of `n` evaluation samples as (indices, real) batches: the
        same number of batches, of the same sizes, on every rank (see `eval_batches`);
        the results of the samples past `real` are padding, to be left out."""
        size = size or self.cfg.train.eval_batch_size or self.cfg.train.micro_batch_size
        return eval_batches(n, size, self.backbone.world_size, self.backbone.rank)

    # ------------------------------------------------------------------ 4. finish

    def finish(self) -> dict[str, float]:
        metrics = self.evaluate() if self.has_eval() else {}
        if metrics:
            self.log(metrics)
        checkpoints = list_checkpoints(self.out / "checkpoints")
        if not checkpoints or checkpoints[-1].name != f"step-{self.step:08d}":
            self.save_checkpoint()
        self.export_final()
        if self.backbone.is_main:
            self.metrics.close()
            plot_metrics(self.out / "metrics.jsonl", self.out / f"{self.stage}_curves.png", self.plot_keys,
                         title=f"{self.stage}: {self.out}")
            (self.out / "final" / "final_metrics.json").write_text(json.dumps(metrics, indent=1))
        self.backbone.barrier()
        return metrics

    def has_eval(self) -> bool:
        return bool(self.data.eval)

    def final_metrics(self) -> dict[str, float]:
        path = self.out / "final" / "final_metrics.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def export_final(self) -> None:
        """Export to final/ through a temporary directory, so final/ is whole or absent."""
        tmp = self.out / ".final.tmp"
        if self.backbone.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.export(tmp)
        if self.backbone.is_main:
            replace_dir(tmp, self.out / "final")
        self.backbone.barrier()

    def export(self, out_dir: Path) -> None:
        """Write the trained model(s) in Hugging Face format (collective: all ranks call)."""
        raise NotImplementedError

    # ================================================================== helpers

    def save_checkpoint(self) -> None:
        path = self.backbone.save_checkpoint(self.engines, self.out / "checkpoints", self.step, self.state(),
                                             self.cfg.checkpoint.keep_last, self.rank_state())
        self.backbone.print(f"[{self.stage}] checkpoint {path}")
        self.last_checkpoint = time.monotonic()

    def log(self, metrics: dict[str, float]) -> None:
        if self.backbone.is_main and metrics:
            self.metrics.write(self.step, metrics)

    def progress_bar(self):
        if not (self.backbone.is_main and self.cfg.logging.progress_bar):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc=self.stage, dynamic_ncols=True)

    def update_progress(self, bar, metrics: dict[str, float]) -> None:
        if bar is None:
            return
        shown = {k.split("/", 1)[1]: f"{metrics[k]:.4g}" for k in self.progress_keys if k in metrics}
        bar.set_postfix(shown, refresh=False)
        bar.update(1)

    def mean_over_ranks(self, total: float | torch.Tensor, count: float | torch.Tensor) -> float:
        """sum(total) / sum(count) over all ranks."""
        t = self.backbone.all_reduce(torch.tensor([float(total), float(count)]))
        return (t[0] / t[1].clamp(min=1)).item()

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.cfg.deepspeed.precision]


def prepare_models(cfg: BaseStageConfig) -> None:
    """Check every model source of the stage (one line naming the key on failure) and
    convert GGUF checkpoints into the cache, before any data work. Run on one rank per
    node first (`main_first`), so a conversion happens once."""
    for key, model_cfg in cfg.models().items():
        check_model_source(model_cfg, key)
    for model_cfg in cfg.models().values():
        model_dir(model_cfg)


__all__ = ["Trainer", "RunDirError", "Preempted", "StageData"]
