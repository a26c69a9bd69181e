"""metrics.jsonl (one JSON object per logged step), optional TensorBoard, and PNG plots."""

from __future__ import annotations

import json
import math
import secrets
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Appends `{"step": s, "train/loss": ...}` lines to OUTPUT_DIR/metrics.jsonl.

    On resume, lines past the resumed step are dropped first, so the file reads as
    one uninterrupted run.
    """

    def __init__(self, out_dir: Path, resume_step: int, tensorboard: bool = False, wandb: Any = None,
                 run_config: dict[str, Any] | None = None):
        self.path = out_dir / "metrics.jsonl"
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            if resume_step == 0:
                kept = []
            self.path.write_text("".join(line + "\n" for line in kept))
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1)
        self.wandb = None
        if wandb is not None and wandb.project is not None:
            self.wandb = start_wandb(wandb, out_dir, run_config)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step}
        for k, v in metrics.items():
            row[k] = float(v) if isinstance(v, (int, float)) or hasattr(v, "item") else v
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(cfg: Any, out_dir: Path, run_config: dict[str, Any] | None):
    """A W&B run for this stage, written under OUTPUT_DIR/wandb. Its id is kept in
    OUTPUT_DIR/wandb_run_id, so a resumed stage continues the same run (W&B ignores
    steps it has already seen)."""
    try:
        import wandb
    except ImportError:
        raise ValueError("logging.wandb.project is set but wandb is not installed: pip install wandb") from None
    id_file = out_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id)
    return wandb.init(project=cfg.project, name=cfg.name or out_dir.name, entity=cfg.entity, group=cfg.group,
                      tags=cfg.tags or None, mode=cfg.mode, dir=str(out_dir), id=run_id, resume="allow",
                      config=run_config, settings=wandb.Settings(silent=True))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: Path, out_png: Path, keys: list[str], title: str = "") -> Path | None:
    """One panel per key that appears in the file, value against step. Returns the PNG path."""
    rows = read_metrics(metrics_path)
    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
