"""Read raw rows from local files and `datasets`, mix them, and split them.

Every row keeps where it came from (`file:line N`, or `dataset[split] row N`) so a
bad row is reported where the user can fix it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.config import DataConfig, SourceConfig


class DataError(ValueError):
    """Bad input data. The message names the file (or dataset), the line (or row) and the field."""


@dataclass
class Row:
    data: dict[str, Any]
    where: str  # e.g. "data/train.jsonl:17"


def read_source(src: SourceConfig, columns: dict[str, str] | None = None) -> list[Row]:
    """All rows of one source, with their locations, columns renamed."""
    if src.path is not None:
        rows = _read_file(Path(src.path))
    else:
        rows = _read_dataset(src)
    if columns:
        for row in rows:
            for old, new in columns.items():
                if old in row.data:
                    row.data[new] = row.data.pop(old)
    return rows


def _read_file(path: Path) -> list[Row]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                rows.append(Row(obj, f"{path}:{lineno}"))
    elif suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]  # {"data": [...]} layout, as some datasets ship
        if not isinstance(obj, list):
            raise DataError(f"{path}: expected a JSON list of objects (or JSONL, one object per line)")
        rows = []
        for i, r in enumerate(obj):
            if not isinstance(r, dict):
                raise DataError(f"{path}: row {i}: expected a JSON object, got {type(r).__name__}")
            rows.append(Row(r, f"{path}: row {i}"))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        rows = [Row(r, f"{path}: row {i}") for i, r in enumerate(table.to_pylist())]
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
    if not rows:
        raise DataError(f"{path}: the file holds no rows")
    return rows


def _read_dataset(src: SourceConfig) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(src.name, src.subset, split=src.split)
    except Exception as e:  # datasets raises many types; the message is what matters
        raise DataError(f"datasets.load_dataset({src.name!r}, {src.subset!r}, split={src.split!r}) "
                        f"failed: {e}") from None
    label = src.describe()
    rows = [Row(dict(r), f"{label} row {i}") for i, r in enumerate(ds)]
    if not rows:
        raise DataError(f"{label}: the dataset holds no rows")
    return rows


def mix(sources: list[list[Row]], weights: list[float], seed: int) -> list[Row]:
    """A deterministic weighted mixture.

    The mixture has as many rows as all sources together; source i contributes
    round(weight_i / sum(weights) * total) rows, drawn without replacement from a
    seeded shuffle of it (repeating the shuffle when it must give more rows than it
    has). One source is returned as it is.
    """
    if len(sources) == 1:
        return sources[0]
    total = sum(len(s) for s in sources)
    wsum = sum(weights)
    rng = random.Random(seed)
    out: list[Row] = []
    for rows, w in zip(sources, weights):
        want = round(w / wsum * total)
        order: list[int] = []
        while len(order) < want:
            perm = list(range(len(rows)))
            rng.shuffle(perm)
            order.extend(perm)
        out.extend(rows[i] for i in order[:want])
    rng.shuffle(out)
    return out


def stage_share(rows: list[Row], shares: list[float], stage_index: int, seed: int) -> list[Row]:
    """The stage's disjoint share of one dataset (DeepSpeed-Chat's data_split).

    The same permutation (from `seed`) is cut into consecutive blocks for SFT, RM and
    PPO, so the three stages never see each other's rows, whichever runs first.
    """
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    total = sum(shares)
    bounds = [0]
    acc = 0.0
    for s in shares:
        acc += s
        bounds.append(round(acc / total * len(rows)))
    lo, hi = bounds[stage_index], bounds[stage_index + 1]
    return [rows[i] for i in sorted(order[lo:hi])]


def holdout(rows: list[Row], ratio: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Split off `ratio` of the rows for evaluation, deterministically."""
    order = list(range(len(rows)))
    random.Random(seed + 1).shuffle(order)
    n_eval = max(1, round(ratio * len(rows)))
    eval_idx = set(order[:n_eval])
    train = [r for i, r in enumerate(rows) if i not in eval_idx]
    return train, [r for i, r in enumerate(rows) if i in eval_idx]


def load_rows(cfg: DataConfig, stage_index: int) -> tuple[list[Row], list[Row]]:
    """Training and evaluation rows for one stage (0 = SFT, 1 = RM, 2 = PPO)."""
    srcs = cfg.all_sources()
    train = mix([read_source(s, cfg.columns) for s in srcs], [s.weight for s in srcs], cfg.seed)
    if cfg.stage_split is not None:
        train = stage_share(train, cfg.stage_split, stage_index, cfg.seed)
        if not train:
            raise DataError(f"data.stage_split {cfg.stage_split} leaves no rows for this stage")
    if cfg.eval is not None:
        eval_rows = read_source(cfg.eval, cfg.columns)
    elif cfg.eval_ratio > 0:
        train, eval_rows = holdout(train, cfg.eval_ratio, cfg.seed)
    else:
        eval_rows = []
    if cfg.max_samples is not None:
        train = train[: cfg.max_samples]
    return train, eval_rows
