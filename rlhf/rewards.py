"""Reward sources: prompts + responses (+ the rows' other fields) -> one float each.

    model     a trained reward model (a frozen scalar-head engine) reads the token ids
    function  a Python function, `module:function` or `path/to/file.py:function`
    url       a reward server over HTTP: batched JSON, a timeout and retries

`RewardSources` sums those a config sets, each with its weight. Every rank scores its
own rows; a model source is a collective under ZeRO-3 (all ranks call it the same
number of times: each rank's rollout has the same number of rows), the others are not.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import torch

from rlhf.config import RewardConfig


class RewardError(ValueError):
    """A reward source failed or answered wrongly; the message names it and the row."""


class FunctionReward:
    """`fn(prompts=[...], responses=[...], **fields) -> [float, ...]`, fields as lists."""

    def __init__(self, spec: str):
        self.spec = spec
        self.fn = load_function(spec)

    def __call__(self, prompts: list[str], responses: list[str], rows: list[dict]) -> list[float]:
        try:
            out = self.fn(prompts=prompts, responses=responses, **row_fields(rows))
        except Exception as e:
            raise RewardError(f"reward.function {self.spec} raised {type(e).__name__}: {e} "
                              f"(scoring {len(prompts)} responses, the first to the row at {where(rows, 0)})") from e
        return checked_scores(out, len(prompts), f"reward.function {self.spec}", rows)


class HttpReward:
    """POST {"prompts", "responses", plus the rows' other fields} to `url` in batches of
    `batch_size`, read {"scores": [...]}; a failed request is tried `retries` more times,
    one second apart, then the run stops naming the server."""

    def __init__(self, url: str, batch_size: int, timeout_s: float, retries: int):
        self.url, self.batch_size, self.timeout_s, self.retries = url, batch_size, timeout_s, retries

    def __call__(self, prompts: list[str], responses: list[str], rows: list[dict]) -> list[float]:
        scores: list[float] = []
        for i in range(0, len(prompts), self.batch_size):
            part = rows[i:i + self.batch_size]
            body = {"prompts": prompts[i:i + self.batch_size], "responses": responses[i:i + self.batch_size],
                    **row_fields(part)}
            answer = self.post(body, part)
            got = answer.get("scores") if isinstance(answer, dict) else None
            scores += checked_scores(got, len(part), f"reward.url {self.url}", part)
        return scores

    def post(self, body: dict, rows: list[dict]):
        data = json.dumps(body).encode()
        error = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(1.0)
            request = urllib.request.Request(self.url, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as r:
                    return json.loads(r.read())
            except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
                error = e
        raise RewardError(f"reward.url {self.url}: no answer after {self.retries + 1} tries ({error}); is the reward "
                          f"server running? (scoring the rows from {where(rows, 0)})")


def load_function(spec: str) -> Callable:
    """`module:function` or `path/to/file.py:function` -> the function (a one-line error
    naming the spec when it cannot be found)."""
    target, _, name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise FileNotFoundError(f"no such file {path}")
            module_spec = importlib.util.spec_from_file_location(f"rlhf_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        fn = getattr(module, name)
    except (ImportError, AttributeError, FileNotFoundError, SyntaxError) as e:
        raise ValueError(f"reward.function: cannot load {spec!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"reward.function: {spec!r} is not callable")
    return fn


def row_fields(rows: list[dict]) -> dict[str, list]:
    """The rows' other fields as lists, one entry per row (None where a row lacks one)."""
    names = sorted({k for r in rows for k in r.get("fields", {})} - {"prompts", "responses"})
    return {k: [r.get("fields", {}).get(k) for r in rows] for k in names}


def where(rows: list[dict], i: int) -> str:
    return rows[i].get("where", f"row {i}") if i < len(rows) else f"row {i}"


def checked_scores(out, n: int, source: str, rows: list[dict]) -> list[float]:
    """`out` as n floats, or a RewardError naming the source and the first bad row."""
    try:
        out = list(out)
    except TypeError:
        raise RewardError(f"{source} returned {type(out).__name__}, not a list of {n} floats") from None
    if len(out) != n:
        raise RewardError(f"{source} returned {len(out)} scores for {n} responses (the first row at {where(rows, 0)})")
    scores = []
    for i, x in enumerate(out):
        try:
            x = float(x)
        except (TypeError, ValueError):
            x = float("nan")
        if x != x or x in (float("inf"), float("-inf")):
            raise RewardError(f"{source} returned {out[i]!r} for the response to the row at {where(rows, i)}: "
                              "scores must be finite numbers")
        scores.append(x)
    return scores


class RewardSources:
    """The weighted sum of the configured sources. `model_scores` is given by the trainer,
    which runs the reward model inside its scoring passes (see OnPolicyTrainer.score);
    the text sources are called here. `timings` holds each source's seconds of the last call."""

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self.text_sources: dict[str, Callable] = {}
        if cfg.function is not None:
            self.text_sources["function"] = FunctionReward(cfg.function)
        if cfg.url is not None:
            self.text_sources["url"] = HttpReward(cfg.url, cfg.url_batch_size, cfg.timeout_s, cfg.retries)
        self.timings: dict[str, float] = {}

    @property
    def has_model(self) -> bool:
        return self.cfg.has_model()

    def weight(self, name: str) -> float:
        return float(self.cfg.weights.get(name, 1.0))

    def score(self, model_scores: torch.Tensor | None, prompts: list[str], responses: list[str],
              rows: list[dict]) -> torch.Tensor:
        """Scores `(B,)`: the sum over sources of weight x score. A lone model source with
        weight 1 passes its scores through untouched."""
        total = None
        if model_scores is not None:
            w = self.weight("model")
            total = model_scores if w == 1.0 else w * model_scores
        for name, source in self.text_sources.items():
            t0 = time.perf_counter()
            s = torch.tensor(source(prompts, responses, rows), dtype=torch.float32)
            self.timings[name] = time.perf_counter() - t0
            s = self.weight(name) * s
            total = s if total is None else total + s.to(total.device, total.dtype)
        return total
