"""Reading configs: YAML with the line of every key, dotted overrides, dict -> dataclass
with type checks, and the Validator that names where a bad value was written.

Nothing here knows the stages; rlhf.config.stages builds on it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

STAGES = ("sft", "rm", "ppo", "grpo", "rloo", "reinforce", "dpo")
"""The section names of a multi-stage file: the stages of rlhf.stages.STAGES, in pipeline order."""


class ConfigError(ValueError):
    """A config value is wrong. The message names the key and where it came from."""


def exact_div(a: int, b: int, a_name: str, b_name: str) -> int:
    """a / b as an int, or a ConfigError naming both quantities."""
    if b <= 0 or a % b != 0:
        raise ConfigError(f"{a_name} = {a} must be divisible by {b_name} = {b}")
    return a // b


class Validator:
    """Collects the key path and the source of each value, so checks can say
    where a bad value was written."""

    def __init__(self, where: dict[str, str] | None = None, prefix: str = ""):
        self.where = where or {}
        self.prefix = prefix

    def key(self, name: str) -> str:
        return ".".join(p for p in (self.prefix, name) if p)

    def check(self, ok: bool, name: str, message: str) -> None:
        if not ok:
            key = self.key(name)
            raise ConfigError(f"{_locate(self.where, key)}{key}: {message}")

    def sub(self, name: str, obj: Any) -> None:
        if hasattr(obj, "validate"):
            obj.validate(Validator(self.where, self.key(name)))


def _locate(where: dict[str, str], key: str) -> str:
    # The most specific key with a known source: a.b.c, then a.b, then a.
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        src = where.get(".".join(parts[:n]))
        if src:
            return f"{src}: "
    return ""


# --------------------------------------------------------------------------- dict -> dataclass


def from_dict(cls: type, data: Any, where: dict[str, str] | None = None, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, checking keys and types.

    Unknown keys raise with a did-you-mean; values are coerced only where that is
    unambiguous (an int where a float is wanted, "1e-5" where a float is wanted,
    since YAML 1.1 reads that as a string).
    """
    where = where or {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{_locate(where, prefix)}{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in data:
        if k not in fields:
            key = f"{prefix}.{k}" if prefix else str(k)
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"{_locate(where, key)}unknown config key {key!r}{hint}")
    defaults = cls()
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        default = getattr(defaults, name)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            # A stage may change a group's defaults (PPO's data truncates prompts by
            # dropping them); keys given in the file apply on top of those defaults.
            value = _deep_merge(dataclasses.asdict(default), value)
        kwargs[name] = _coerce(hints[name], value, key, where)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, where: dict[str, str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{_locate(where, key)}{key}: expected {expected}, got {value!r}")

    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else bad(" or ".join(_type_name(a) for a in args))
    if origin is Literal:
        if value not in args:
            raise bad("one of " + ", ".join(repr(a) for a in args))
        return value
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, key)
    if origin is list:
        if isinstance(value, str) and args and args[0] in (int, float):
            value = [x.strip() for x in value.split(",")]  # "2,4,4" on a command line
        if not isinstance(value, list):
            raise bad("a list")
        return [_coerce(args[0], x, f"{key}.{i}", where) for i, x in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if tp is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise bad("an integer") from None
            if f.is_integer():
                return int(f)
        raise bad("an integer")
    if tp is float:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad("a number") from None
        raise bad("a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    raise TypeError(f"config field {key} has unsupported type {tp}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- YAML with line numbers


def load_yaml(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """Read a YAML mapping and the `file:line` of every key in it (dotted keys)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    where: dict[str, str] = {}

    def walk(n: Any, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                where[key] = f"{path}:{k.start_mark.line + 1}"
                walk(v, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, f"{prefix}.{i}")

    walk(node, "")
    return data, where


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", parsed value). Values are read as YAML scalars or lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _interpolate(data: Any, root: str) -> Any:
    if isinstance(data, dict):
        return {k: _interpolate(v, root) for k, v in data.items()}
    if isinstance(data, list):
        return [_interpolate(v, root) for v in data]
    if isinstance(data, str):
        return data.replace("${output_dir}", root)
    return data


def is_multi_stage(data: dict[str, Any], cls: type | None = None) -> bool:
    """Whether a file holds stage sections (`sft:`, `ppo:`, ...) rather than one stage's fields.

    A stage's own hyperparameter group can share a stage's name (PPOConfig's `ppo:`), so
    when the stage being loaded (`cls`) is known, a top-level stage key counts as a
    section only if it is no field of `cls`, or if it holds a key its field's group does
    not have (a stage-level key such as `policy:`).
    """
    fields = {f.name: f for f in dataclasses.fields(cls)} if cls is not None else {}
    hints = typing.get_type_hints(cls) if cls is not None else {}
    for s in STAGES:
        if s not in data:
            continue
        if s not in fields:
            return True
        group = hints[s]
        value = data[s]
        if isinstance(value, dict) and dataclasses.is_dataclass(group):
            own = {f.name for f in dataclasses.fields(group)}
            if any(k not in own for k in value):
                return True
    return False


def resolve_stage_dict(
    data: dict[str, Any], where: dict[str, str], stage: str, overrides: list[str] = (), source: str = "config",
    cls: type | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The plain dict for one stage of a (multi- or single-stage) config, with overrides.

    `cls`, the stage's config class, tells a single-stage file's hyperparameter group
    (`ppo:` of PPOConfig) from a section (see `is_multi_stage`).
    Returns the dict and the provenance map re-keyed to the stage's own keys.
    """
    data = dict(data)
    if is_multi_stage(data, cls):
        if stage not in data:
            raise ConfigError(f"{source} has no `{stage}:` section (it has: "
                              f"{', '.join(s for s in STAGES if s in data)})")
        root = str(data.get("output_dir", "runs/default"))
        shared = {k: v for k, v in data.items() if k not in STAGES and k != "pipeline"}
        section = data[stage] or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{where.get(stage, source)}: `{stage}:` must be a mapping")
        merged = _deep_merge(shared, section)
        if "output_dir" not in section:
            merged["output_dir"] = f"{root}/{stage}"
        stage_where = {}
        for k, src in where.items():
            head, _, rest = k.partition(".")
            if head == stage and rest:
                stage_where[rest] = src
            elif head not in STAGES and k not in stage_where:
                stage_where[k] = src
    else:
        root = str(data.get("output_dir", "runs/default"))
        merged, stage_where = data, dict(where)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(merged, key, value)
        stage_where[key] = f"command-line override {text!r}"
    # interpolation happens after overrides so that `${output_dir}` in an override works too
    return _interpolate(merged, root), stage_where


def dump(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
