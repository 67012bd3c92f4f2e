"""Declared options and their one validator.

A method (``ats.methods``) or a dataset (``ats.models.sources``) declares its options as
``Option``s: a name, the value types it takes, a default, and where it applies a set of
allowed strings or a lower bound. ``parse_options`` checks a mapping of values against such a
schema for every entry point (study files, ``ats fit --option``, ``fit_method``), so a bad value
gets the same one-line error everywhere: the option's dotted path, what it must be, what it got.
"""
from __future__ import annotations

import difflib
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, NoReturn

KINDS = ("int", "float", "str", "bool", "None", "pair")
_WANTED = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
           "None": "null", "pair": "a list of two numbers"}
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class OptionError(ValueError):
    """A bad option value: ``path: message`` (the dotted path of the option, and the fix)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path, self.message = path, message


def fail(path: str, message: str) -> NoReturn:
    raise OptionError(path, message)


def did_you_mean(word: Any, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for a close match (difflib), else the one choice containing ``word``."""
    choices = list(choices)
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    if not close:
        close = [c for c in choices if len(str(word)) >= 3 and str(word).lower() in c.lower()]
    return f" (did you mean {close[0]!r}?)" if len(close) == 1 else ""


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@dataclass(frozen=True)
class Option:
    """One option: the value types it takes (``KINDS``), its default, and optionally the
    strings it allows (``choices``), a lower bound (``low``; exclusive when ``strict``) and an
    upper one (``high``)."""
    name: str
    kinds: frozenset[str]
    default: Any = None
    choices: tuple[str, ...] = ()
    low: float | None = None
    strict: bool = False
    help: str = ""
    high: float | None = None     # inclusive upper bound

    def parse(self, value: Any, path: str) -> Any:
        """``value`` checked against this option (numbers finite and within bounds); the
        parsed value (floats as float, pairs as a list of two floats)."""
        kinds = self.kinds
        if value is None and "None" in kinds:
            return None
        if "bool" in kinds and isinstance(value, bool):
            return value
        if "int" in kinds and isinstance(value, int) and not isinstance(value, bool):
            return self._bounded(value, path)
        if "float" in kinds:
            return self._bounded(float(number(value, path)), path)
        if "str" in kinds and isinstance(value, str):
            return choice(value, path, self.choices) if self.choices else value
        if "pair" in kinds and isinstance(value, (list, tuple)) and len(value) == 2:
            return [float(number(v, f"{path}[{i}]")) for i, v in enumerate(value)]
        fail(path, f"must be {' or '.join(_WANTED[k] for k in sorted(kinds))}, got {value!r}")

    def _bounded(self, value: float, path: str) -> float:
        if self.low is not None and (value <= self.low if self.strict else value < self.low):
            fail(path, f"must be {'>' if self.strict else '>='} {self.low:g}, got {value!r}")
        if self.high is not None and value > self.high:
            fail(path, f"must be <= {self.high:g}, got {value!r}")
        return value


def number(value: Any, path: str, low: float | None = None, strict: bool = False) -> float:
    """A finite number (YAML's ``1e-3`` without a dot reads as a string and is accepted)."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail(path, f"must be a number, got {value!r}")
    if low is not None and (value <= low if strict else value < low):
        fail(path, f"must be {'>' if strict else '>='} {low:g}, got {value!r}")
    return value


def integer(value: Any, path: str, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        fail(path, f"must be an integer{'' if low is None else f' >= {low}'}, got {value!r}")
    if low is not None and value < low:
        fail(path, f"must be >= {low}, got {value}")
    return value


def choice(value: Any, path: str, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        fail(path, f"unknown value {value!r}{did_you_mean(value, allowed)}; choose one of {', '.join(allowed)}")
    return value


def mapping(value: Any, path: str, allowed: Iterable[str]) -> dict[str, Any]:
    """``value`` as a mapping whose keys are all in ``allowed`` (None reads as empty)."""
    allowed = tuple(allowed)
    if value is None:
        return {}
    if not isinstance(value, dict):
        fail(path or "<top level>", f"must be a mapping with keys {', '.join(allowed)}, got {value!r}")
    for key in value:
        if key not in allowed:
            fail(join(path, str(key)), f"unknown key{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}")
    return value


Schema = Mapping[str, Option]


def parse_options(schema: Schema, value: Any, path: str,
                  nested: Mapping[str, Schema] | None = None) -> dict[str, Any]:
    """The options ``value`` checked against ``schema``; ``nested`` names option groups of
    other schemas (a method's options for the methods it runs first: ``ld3``, ``oracle``)."""
    nested = nested or {}
    out = {}
    for key, v in mapping(value, path, tuple(schema) + tuple(nested)).items():
        out[key] = parse_options(nested[key], v, join(path, key)) if key in nested \
            else schema[key].parse(v, join(path, key))
    return out


def _kinds(annotation: Any) -> frozenset[str] | None:
    """The option kinds of a type hint, or None for what is no option (tensors, callables)."""
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) \
        or typing.get_origin(annotation) is typing.Union else (annotation,)
    names = {int: "int", float: "float", str: "str", bool: "bool", type(None): "None"}
    kinds = set()
    for a in args:
        if a in names:
            kinds.add(names[a])
        elif typing.get_origin(a) is tuple and typing.get_args(a) == (float, float):
            kinds.add("pair")
        else:
            return None
    return frozenset(kinds)


def declare(fn: Callable[..., Any], inputs: Iterable[str], *, choices: Mapping[str, tuple[str, ...]] | None = None,
            low: Mapping[str, float] | None = None, positive: Iterable[str] = (),
            extra: Iterable[Option] = ()) -> dict[str, Option]:
    """The options of ``fn``: its keyword parameters other than ``inputs`` (what the caller
    supplies), with the types of their hints and their defaults; ``choices``, ``low`` (>=)
    and ``positive`` (> 0) add bounds; ``extra`` adds options the caller reads itself.
    A parameter that is neither an input nor of an option type is a declaration error."""
    inputs, choices, low, positive = set(inputs), dict(choices or {}), dict(low or {}), set(positive)
    hints = typing.get_type_hints(fn)
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        if name in inputs or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        kinds = _kinds(hints.get(name))
        if kinds is None or p.default is inspect.Parameter.empty:
            raise TypeError(f"{fn.__qualname__}: parameter {name!r} is neither an input nor an option")
        bound = 0. if name in positive else low.get(name)
        out[name] = Option(name, kinds, p.default, choices.get(name, ()), bound, name in positive)
    for option in extra:
        out[option.name] = option
    unknown = (set(choices) | set(low) | positive) - set(out)
    if unknown:
        raise TypeError(f"{fn.__qualname__}: bounds for unknown options {sorted(unknown)}")
    return out
