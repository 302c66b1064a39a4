"""YAML configs as typed dataclasses: presets shipped with the package, `--set a.b=value` overrides.

Unknown keys and values of the wrong type are rejected with one line naming the key, so a
typo in a config never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from importlib import resources
from pathlib import Path

import yaml

from .errors import PssrError


class ConfigError(PssrError):
    """A config that cannot be used (one line, naming the key)."""


SEED_MAX = 2**63 - 1  # seeds are int64 wherever they go (torch generators, safetensors metadata, numpy)


def check_seed(seed: int, key: str = "seed") -> None:
    """A seed must be an integer in [0, 2**63 - 1] (raised as ValueError, as __post_init__ checks do)."""
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"{key} must be an integer from 0 to 2**63-1, got {seed}")


def check_limit(value: int | None, key: str) -> None:
    """An image count such as data.train_limit: unset (all images) or at least 1."""
    if value is not None and value < 1:
        raise ValueError(f"{key} must be >= 1 (leave it unset for all images), got {value}")


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a key given twice in one mapping is an error (SafeLoader
    keeps the last value silently, so a config could say one thing and run another)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader's own error says so below
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {first})", key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _yaml_error(exc: yaml.YAMLError) -> str:
    """One line: 'context: problem at line L, column C'."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return (f"{exc.context}: " if exc.context else "") + exc.problem + at
    return " ".join(str(exc).split())


def parse_yaml(text: str, where: str):
    """YAML text -> data, with UniqueKeyLoader; any YAML error is one ConfigError line."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({_yaml_error(exc)})") from None


def preset_names(prefix: str) -> list[str]:
    """Shipped presets named `<prefix>-<name>.yaml` in pssr/configs."""
    folder = resources.files("pssr") / "configs"
    names = [p.name for p in folder.iterdir() if p.name.startswith(prefix + "-") and p.name.endswith(".yaml")]
    return sorted(n[len(prefix) + 1 : -len(".yaml")] for n in names)


def read_source(source: str, prefix: str) -> dict:
    """A preset name (e.g. 'mnist') or a path to a YAML file -> its mapping."""
    if source in preset_names(prefix):
        text = (resources.files("pssr") / "configs" / f"{prefix}-{source}.yaml").read_text(encoding="utf-8")
        where = f"preset {source!r}"
    else:
        path = Path(source)
        if not path.is_file():
            presets = ", ".join(preset_names(prefix)) or "none"
            raise ConfigError(f"{source}: no such config file and no such preset (presets: {presets})")
        where = str(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            line = exc.object[: exc.start].count(b"\n") + 1
            raise ConfigError(f"{where}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} on line {line}); "
                              f"save the file as UTF-8") from None
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    data = parse_yaml(text, where) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections")
    return data


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """`a.b=value` pairs onto a nested mapping; values are parsed as YAML scalars."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
        *parents, leaf = key.strip().split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        try:
            node[leaf] = yaml.load(raw, Loader=UniqueKeyLoader) if raw.strip() else None
        except yaml.YAMLError:
            node[leaf] = raw
    return data


def _check_value(value, hint, key: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_value(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: must be a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (typing.Any,)
        return tuple(_check_value(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 5e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):  # NaN would pass every `x <= 0` check below
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return value
    return value


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def from_dict(cls, data, key: str = ""):
    """Build dataclass ``cls`` from a mapping, recursively; unknown keys are errors."""
    where = key or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    kwargs = {name: _check_value(value, hints[name], f"{key}.{name}" if key else name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load(cls, source: str, overrides=(), prefix: str = "classifier"):
    """Preset or file, then overrides, then typed validation."""
    return from_dict(cls, apply_overrides(read_source(source, prefix), overrides))


def to_dict(obj) -> dict:
    """The plain mapping of a config (tuples as lists), as YAML and JSON want it."""

    def plain(v):
        if isinstance(v, tuple):
            return [plain(i) for i in v]
        if isinstance(v, dict):
            return {k: plain(i) for k, i in v.items()}
        return v

    return plain(dataclasses.asdict(obj))
