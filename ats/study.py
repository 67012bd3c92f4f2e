"""The study specification of ``ats search``: one YAML file per study (``studies/*.yaml``).

A study names a model, the solvers and NFEs to fit for, the teacher, the data sizes, the
baselines, and for every method its fixed options and its search space. Everything is
validated when the file is loaded, before anything runs: a bad field raises a one-line
``StudyError`` with the file, the field's dotted path and the allowed values. The format is
documented in ``studies/README.md``.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn

import yaml

from .atomic import write_atomic
from .solvers import steps_for_nfe
from .discretize import KINDS
from .methods import METHODS
from .methods.dmn import SOLVERS as DMN_SOLVERS
from .methods.ld3 import fit_ld3
from .methods.oracle import fit_oracle
from .methods.predictors import fit_predictor
from .methods.timetuner import STRATEGIES, fit_timetuner
from .metrics import LOSSES
from .models.sources import DATASETS, GMM_PRESETS
from .params import SPACES
from .solvers.sampling import SOLVERS, solver_spec
from .teacher import TeacherConfig

SAMPLERS = ("tpe", "random", "cmaes", "gp", "qmc")
PARAM_TYPES = ("uniform", "loguniform", "int", "choice")
SEARCHABLE = tuple(m for m in METHODS if m not in ("dmn", "gits"))
BASELINES = KINDS[:4] + ("dmn", "gits")
MODEL_OPTIONS: dict[str, dict[str, Any]] = {          # each dataset's model options and defaults
    "gmm": {"preset": "16d"},
    "digits": {"guidance_scale": None},
    "cifar10": {"checkpoint": None, "inception_weights": None, "fid_reference": None},
}
TOP_KEYS = ("name", "dataset", "model", "solvers", "nfes", "order", "teacher", "data", "baselines", "methods",
            "trials", "sampler", "seed", "resources", "max_failures")
DATA_DEFAULTS = {"n_train": 50, "n_valid": 50, "n_select": 2000, "n_eval": 5000}
RESOURCE_DEFAULTS = {"cpus_per_trial": 1, "gpus_per_trial": 0, "max_concurrent": 1}
# String options with a fixed set of values (checked here so a typo fails at load, not mid-search).
OPTION_VALUES: dict[str, tuple[str, ...]] = {
    "loss": tuple(LOSSES) + ("lpips",), "space": SPACES, "optimizer": ("rmsprop", "adam"),
    "objective": ("end_to_end", "regression"), "strategy": STRATEGIES, "explore_sampler": ("tpe", "cmaes"),
    "discretization": KINDS, "start": ("best",) + KINDS[:4],
}
# Fit-function keywords that are no method options: set by the study (seed, order, solver), by the
# caller (progress), or fixed by how schedules are sampled (lower_order_final, variant).
_RESERVED = {"seed", "order", "solver", "progress", "lower_order_final", "variant"}
_FIT_FUNCTIONS: dict[str, Callable[..., Any]] = {"ld3": fit_ld3, "timetuner": fit_timetuner,
                                                  "oracle": fit_oracle, "oneshot": fit_predictor,
                                                  "delta": fit_predictor}
_EXTRA = {"timetuner": {"discretization": frozenset({"str"}), "n_data": frozenset({"int"})}}  # read by fit_method
NESTED = {"oracle": ("ld3",), "oneshot": ("ld3", "oracle"), "delta": ("ld3", "oracle")}  # option dicts per method
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class StudyError(ValueError):
    """A study that cannot run: the file, the field's dotted path, what is wrong and the fix."""


@dataclass(frozen=True)
class Param:
    """One hyperparameter of a method's search space; ``name`` is the option it sets
    (dotted for nested options: ``ld3.lr``, ``oracle.restarts``)."""
    name: str
    kind: str                      # uniform | loguniform | int | choice
    low: float | None = None
    high: float | None = None
    log: bool = False              # for "int"
    values: tuple | None = None    # for "choice"

    def to_dict(self) -> dict[str, Any]:
        """The YAML entry of this parameter (without its name)."""
        if self.kind == "choice":
            return {"type": "choice", "values": list(self.values)}
        entry = {"type": self.kind, "low": self.low, "high": self.high}
        return {**entry, "log": self.log} if self.kind == "int" else entry


@dataclass(frozen=True)
class MethodSpec:
    """A method of the study: fixed options for its fit function and its searched parameters."""
    name: str
    options: dict
    space: tuple[Param, ...]


@dataclass(frozen=True)
class Study:
    """A validated study; build it with ``load_study`` or ``study_from_dict``."""
    name: str
    dataset: str
    model: dict
    solvers: tuple[str, ...]
    nfes: tuple[int, ...]
    order: int | None
    teacher: TeacherConfig
    n_train: int
    n_valid: int      # the methods' own validation (teacher loss, early stopping)
    n_select: int     # seeds whose FID ranks the trials (the Optuna objective) and the baselines
    n_eval: int       # held-out seeds of the final table
    baselines: tuple[str, ...]
    methods: tuple[MethodSpec, ...]
    trials: int
    sampler: str
    seed: int
    cpus_per_trial: float
    gpus_per_trial: float
    max_concurrent: int
    max_failures: int

    def cells(self) -> list[tuple[str, str, int]]:
        """(method, solver, nfe) for every method x solver x NFE, in the study's order."""
        return [(m.name, s, n) for m in self.methods for s in self.solvers for n in self.nfes]

    def baseline_cells(self) -> list[tuple[str, str, int]]:
        """(baseline, solver, nfe) for every baseline x solver x NFE."""
        return [(b, s, n) for b in self.baselines for s in self.solvers for n in self.nfes]

    def source_options(self) -> dict[str, Any]:
        """Keyword arguments of ``load_source(self.dataset, ...)``."""
        if self.dataset == "gmm":
            return dict(GMM_PRESETS[self.model["preset"]])
        if self.dataset == "digits":
            scale = self.model["guidance_scale"]
            return {} if scale is None else {"conditional": True, "guidance_scale": scale}
        return dict(self.model)

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved study in the YAML layout (plain lists and dicts)."""
        return {
            "name": self.name, "dataset": self.dataset, "model": dict(self.model),
            "solvers": list(self.solvers), "nfes": list(self.nfes), "order": self.order,
            "teacher": {"solver": self.teacher.solver, "nfe": self.teacher.nfe,
                        "discretization": self.teacher.discretization, "order": self.teacher.order},
            "data": {k: getattr(self, k) for k in DATA_DEFAULTS},
            "baselines": list(self.baselines),
            "methods": {m.name: {"options": copy.deepcopy(m.options),
                                 "space": {p.name: p.to_dict() for p in m.space}} for m in self.methods},
            "trials": self.trials, "sampler": self.sampler, "seed": self.seed,
            "resources": {"cpus_per_trial": self.cpus_per_trial, "gpus_per_trial": self.gpus_per_trial,
                          "max_concurrent": self.max_concurrent},
            "max_failures": self.max_failures,
        }

    def with_overrides(self, **fields: Any) -> Study:
        """A copy with command-line overrides, validated again. Fields: name, solvers, nfes,
        order, baselines, methods (a subset of the study's, by name), n_train, n_valid, n_select, n_eval,
        trials, sampler, seed, cpus_per_trial, gpus_per_trial, max_concurrent, max_failures,
        and model options (preset, guidance_scale, checkpoint, ...). None means "not given"."""
        data = self.to_dict()
        model_keys = {k for opts in MODEL_OPTIONS.values() for k in opts}
        groups = {**dict.fromkeys(DATA_DEFAULTS, "data"), **dict.fromkeys(RESOURCE_DEFAULTS, "resources"),
                  **dict.fromkeys(model_keys, "model")}
        top = {"name", "solvers", "nfes", "order", "baselines", "trials", "sampler", "seed", "max_failures"}
        for key, value in fields.items():
            if value is None:
                continue
            if key == "methods":
                data["methods"] = self._method_subset(value, data["methods"])
            elif key in groups:
                data[groups[key]][key] = str(value) if isinstance(value, Path) else value
            elif key in top:
                data[key] = list(value) if isinstance(value, tuple) else value
            else:
                _fail("overrides", key, f"cannot be overridden{_did_you_mean(key, sorted(top | set(groups)))}; "
                                        f"allowed: {', '.join(sorted(top | set(groups) | {'methods'}))}")
        return study_from_dict(data, origin="overrides")

    def _method_subset(self, names: Any, methods: dict[str, Any]) -> dict[str, Any]:
        """``methods`` (the study's, as in ``to_dict``) restricted to ``names``, in the study's order."""
        have = [m.name for m in self.methods]
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
            _fail("overrides", "methods", f"must be a non-empty list of method names from {', '.join(have)}")
        for name in names:
            if name not in have:
                _fail("overrides", "methods", f"{name!r} is not a method of study {self.name}"
                                              f"{_did_you_mean(name, have)}; choose from {', '.join(have)}")
        return {k: v for k, v in methods.items() if k in names}

    def method(self, name: str) -> MethodSpec:
        """The study's spec of method ``name``."""
        for m in self.methods:
            if m.name == name:
                return m
        _fail(f"study {self.name}", "methods",
              f"has no method {name!r}; it has {', '.join(m.name for m in self.methods)}")

    def method_options(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """The method's fixed options deep-merged with sampled ``params`` (dotted names become
        nested dicts: ``ld3.lr`` -> ``{"ld3": {"lr": ...}}``), ready for ``fit_method(options=...)``."""
        spec = self.method(method)
        space = {p.name: p for p in spec.space}
        merged = copy.deepcopy(spec.options)
        for name, value in params.items():
            if name not in space:
                _fail(f"study {self.name}", f"methods.{method}.space",
                      f"has no parameter {name!r}; searched: {', '.join(space) or 'none'}")
            *parents, leaf = name.split(".")
            target = merged
            for part in parents:
                target = target.setdefault(part, {})
            target[leaf] = int(value) if space[name].kind == "int" else value
        return merged


def load_study(path: str | Path) -> Study:
    """Read and validate a study file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise StudyError(f"{path}: cannot read the study file ({e.strerror or e}); "
                         "pass an existing YAML file with --study (format: studies/README.md)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise StudyError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    return study_from_dict(data, origin=str(path))


def study_path(dataset: str) -> Path:
    """The shipped study of ``dataset``: ``studies/<dataset>.yaml`` in the repository."""
    path = Path(__file__).resolve().parent.parent / "studies" / f"{dataset}.yaml"
    if not path.is_file():
        raise StudyError(f"{path}: no shipped study for dataset {dataset!r} (shipped: "
                         f"{', '.join(DATASETS)}); write one (see studies/README.md) and pass it with --study FILE")
    return path


def write_study(study: Study, path: str | Path) -> Path:
    """Write the resolved study as YAML, atomically; ``load_study`` reads it back equal."""
    text = yaml.safe_dump(study.to_dict(), sort_keys=False, default_flow_style=None, width=100)
    return write_atomic(path, lambda tmp: tmp.write_text(text))


# ----------------------------------------------------------------------------- validation

def _fail(origin: str, path: str, message: str) -> NoReturn:
    raise StudyError(f"{origin}: {path}: {message}")


def _did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """A close match (difflib), else the one choice that contains ``word``."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    if not close:
        close = [c for c in choices if len(str(word)) >= 3 and str(word).lower() in c.lower()]
    return f" (did you mean {close[0]!r}?)" if len(close) == 1 else ""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def option_types(method: str) -> dict[str, frozenset[str]]:
    """The options of a method's fit function (``ld3``, ``timetuner``, ``oracle``, ``oneshot``,
    ``delta``) with the value types each takes: int, float, str, bool, None, pair."""
    out = {}
    for name, p in inspect.signature(_FIT_FUNCTIONS[method]).parameters.items():
        if p.default is inspect.Parameter.empty or name in _RESERVED:
            continue
        ann = p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)
        kinds = {"pair" if a == "tuple[float,float]" else a for a in ann.replace(" ", "").split("|")}
        if kinds <= {"int", "float", "str", "bool", "None", "pair"}:   # tensors, callables: not options
            out[name] = frozenset(kinds)
    return {**out, **_EXTRA.get(method, {})}


class _Reader:
    """Validates one study document; every error names ``origin`` and the field path."""

    def __init__(self, origin: str) -> None:
        self.origin = origin

    def fail(self, path: str, message: str) -> NoReturn:
        _fail(self.origin, path, message)

    def mapping(self, value: Any, path: str, allowed: tuple[str, ...] | list[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(path or "<top level>", f"must be a mapping with keys {', '.join(allowed)}, got {value!r}")
        for key in value:
            if key not in allowed:
                self.fail(_join(path, str(key)), f"unknown key{_did_you_mean(key, allowed)}; "
                                                  f"allowed: {', '.join(allowed)}")
        return value

    def integer(self, value: Any, path: str, low: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"must be an integer{'' if low is None else f' >= {low}'}, got {value!r}")
        if low is not None and value < low:
            self.fail(path, f"must be >= {low}, got {value}")
        return value

    def number(self, value: Any, path: str, low: float | None = None, strict: bool = False) -> float:
        """A number (YAML's ``1e-3`` without a dot reads as a string and is accepted)."""
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            self.fail(path, f"must be a number, got {value!r}")
        if low is not None and (value <= low if strict else value < low):
            self.fail(path, f"must be {'>' if strict else '>='} {low:g}, got {value!r}")
        return value

    def choice(self, value: Any, path: str, allowed: tuple[str, ...] | list[str]) -> str:
        if value not in allowed or not isinstance(value, str):
            self.fail(path, f"unknown value {value!r}{_did_you_mean(value, allowed)}; "
                            f"choose one of {', '.join(allowed)}")
        return value

    def names(self, value: Any, path: str, allowed: tuple[str, ...], empty: bool = False) -> tuple[str, ...]:
        if not isinstance(value, list) or (not value and not empty):
            self.fail(path, f"must be a {'' if empty else 'non-empty '}list of names from {', '.join(allowed)}, "
                            f"got {value!r}")
        out = tuple(self.choice(v, f"{path}[{i}]", allowed) for i, v in enumerate(value))
        if len(set(out)) != len(out):
            self.fail(path, f"lists a name twice: {value!r}")
        return out

    # --- the parts of a study

    def model(self, value: Any, dataset: str) -> dict[str, Any]:
        own = MODEL_OPTIONS[dataset]
        if isinstance(value, dict):
            for key in value:
                other = [d for d, opts in MODEL_OPTIONS.items() if key in opts and d != dataset]
                if other:
                    self.fail(f"model.{key}", f"is an option of dataset {other[0]}, not {dataset}; "
                                              f"{dataset} takes: {', '.join(own)}")
        given = self.mapping(value, "model", tuple(own))
        model = {**own, **given}
        if dataset == "gmm":
            self.choice(model["preset"], "model.preset", tuple(GMM_PRESETS))
        elif dataset == "digits":
            if model["guidance_scale"] is not None:
                model["guidance_scale"] = float(self.number(model["guidance_scale"], "model.guidance_scale"))
        else:
            for key, path in model.items():
                if isinstance(path, Path):
                    model[key] = str(path)
                elif path is not None and (not isinstance(path, str) or not path):
                    self.fail(f"model.{key}", f"must be a path or null, got {path!r}")
        return model

    def nfes(self, value: Any, solvers: tuple[str, ...]) -> tuple[int, ...]:
        if not isinstance(value, list) or not value:
            self.fail("nfes", f"must be a non-empty list of integers >= 1, got {value!r}")
        out = tuple(self.integer(v, f"nfes[{i}]", 1) for i, v in enumerate(value))
        if len(set(out)) != len(out):
            self.fail("nfes", f"lists an NFE twice: {value!r}")
        for i, n in enumerate(out):
            for s in solvers:
                if steps_for_nfe(s, n) is None:
                    near = [m for m in (n - 1, n + 1) if m >= 1 and steps_for_nfe(s, m) is not None]
                    self.fail(f"nfes[{i}]", f"solver {s} cannot spend exactly {n} network calls; "
                                            f"it can spend {' or '.join(map(str, near))}")
        return out

    def order(self, value: Any, solvers: tuple[str, ...], path: str) -> int | None:
        if value is not None:
            self.integer(value, path, 1)
        for s in solvers:
            try:
                solver_spec(s, value)
            except ValueError as e:
                self.fail(path, str(e))
        return value

    def teacher(self, value: Any) -> TeacherConfig:
        d = TeacherConfig()
        given = self.mapping(value, "teacher", ("solver", "nfe", "discretization", "order"))
        t = {"solver": d.solver, "nfe": d.nfe, "discretization": d.discretization, "order": d.order, **given}
        solver = self.choice(t["solver"], "teacher.solver", tuple(SOLVERS))
        nfe = self.integer(t["nfe"], "teacher.nfe", 1)
        if steps_for_nfe(solver, nfe) is None:
            self.fail("teacher.nfe", f"solver {solver} cannot spend exactly {nfe} network calls; use {nfe + 1}")
        return TeacherConfig(solver, nfe, self.choice(t["discretization"], "teacher.discretization", KINDS),
                             self.order(t["order"], (solver,), "teacher.order"))

    def value(self, value: Any, kinds: frozenset[str], path: str, name: str) -> Any:
        """A fixed option value of one of ``kinds`` (and of ``OPTION_VALUES[name]`` for strings)."""
        if value is None and "None" in kinds:
            return None
        if "bool" in kinds and isinstance(value, bool):
            return value
        if "int" in kinds and isinstance(value, int) and not isinstance(value, bool):
            return value
        if "float" in kinds:
            return float(self.number(value, path))
        if "str" in kinds and isinstance(value, str):
            return self.choice(value, path, OPTION_VALUES[name]) if name in OPTION_VALUES else value
        if "pair" in kinds and isinstance(value, (list, tuple)) and len(value) == 2:
            return [float(self.number(v, f"{path}[{i}]")) for i, v in enumerate(value)]
        wanted = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
                  "None": "null", "pair": "a list of two numbers"}
        self.fail(path, f"must be {' or '.join(wanted[k] for k in sorted(kinds))}, got {value!r}")

    def options(self, value: Any, method: str, path: str, nested: tuple[str, ...] = ()) -> dict[str, Any]:
        """Fixed options of ``method``'s fit function; ``nested``: option dicts of other fits."""
        types = option_types(method)
        out = {}
        for key, v in self.mapping(value, path, tuple(types) + nested).items():
            if key in nested:
                out[key] = self.options(v, key, _join(path, key))
            else:
                out[key] = self.value(v, types[key], _join(path, key), key)
        return out

    def param_types(self, method: str, name: str, path: str) -> tuple[str, frozenset[str]]:
        """The option a (dotted) parameter name sets: (its leaf name, its value types)."""
        nested, parts = NESTED.get(method, ()), name.split(".")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] not in nested):
            hint = f"nested names are {', '.join(n + '.OPTION' for n in nested)}" if nested \
                else f"{method} has no nested options"
            self.fail(path, f"unknown parameter; {hint}")
        owner = parts[0] if len(parts) == 2 else method
        types = option_types(owner)
        if parts[-1] not in types:
            self.fail(path, f"{parts[-1]!r} is not an option of {owner}{_did_you_mean(parts[-1], tuple(types))}; "
                            f"options: {', '.join(types)}")
        return parts[-1], types[parts[-1]]

    def param(self, name: str, entry: Any, method: str, path: str) -> Param:
        leaf, kinds = self.param_types(method, name, path)
        if not isinstance(entry, dict) or "type" not in entry:
            self.fail(path, f"must be a mapping with a type ({', '.join(PARAM_TYPES)}), got {entry!r}")
        kind = self.choice(entry["type"], f"{path}.type", PARAM_TYPES)
        keys = {"uniform": ("low", "high"), "loguniform": ("low", "high"), "int": ("low", "high", "log"),
                "choice": ("values",)}[kind]
        self.mapping(entry, path, ("type",) + keys)
        for key in keys:
            if key not in entry and key != "log":
                self.fail(_join(path, key), f"is required for type {kind}")
        if kind == "choice":
            values = entry["values"]
            if not isinstance(values, list) or not values:
                self.fail(f"{path}.values", f"must be a non-empty list, got {values!r}")
            if "pair" in kinds:
                self.fail(path, f"{leaf} is a pair and cannot be searched; fix it under options")
            out = tuple(self.value(v, kinds, f"{path}.values[{i}]", leaf) for i, v in enumerate(values))
            if len(set(out)) != len(out):
                self.fail(f"{path}.values", f"lists a value twice: {values!r}")
            return Param(name, kind, values=out)
        if kind == "int":
            if not kinds & {"int", "float"}:
                self.fail(f"{path}.type", f"{leaf} takes {'/'.join(sorted(kinds))}; use type choice")
            low, high = (self.integer(entry[k], f"{path}.{k}") for k in ("low", "high"))
            log = entry.get("log", False)
            if not isinstance(log, bool):
                self.fail(f"{path}.log", f"must be true or false, got {log!r}")
            if log and low < 1:
                self.fail(f"{path}.low", f"must be >= 1 for a log-scaled int parameter, got {low}")
        else:
            if "float" not in kinds:
                self.fail(f"{path}.type", f"{leaf} takes {'/'.join(sorted(kinds))}, not a float; "
                                          f"use type {'int' if 'int' in kinds else 'choice'}")
            low, high = (float(self.number(entry[k], f"{path}.{k}")) for k in ("low", "high"))
            log = False
            if kind == "loguniform" and low <= 0:
                self.fail(f"{path}.low", f"must be > 0 for a loguniform parameter, got {low:g}")
        if low >= high:
            self.fail(f"{path}.low", f"must be below high ({high:g}), got {low:g}")
        return Param(name, kind, low, high, log)

    def method(self, name: str, value: Any, study: dict[str, Any]) -> MethodSpec:
        path = f"methods.{name}"
        if name in ("dmn", "gits"):
            self.fail(path, f"{name} has nothing to search; list it under baselines")
        if name not in SEARCHABLE:
            self.fail(path, f"unknown method{_did_you_mean(name, SEARCHABLE)}; choose from {', '.join(SEARCHABLE)}")
        if name == "timetuner" and study["dataset"] == "cifar10":
            self.fail(path, "timetuner trains on real data, available for gmm and digits only")
        if name == "delta" and min(steps_for_nfe(s, n) for s in study["solvers"] for n in study["nfes"]) < 2:
            self.fail(path, "the delta predictor needs at least 2 steps; raise the smallest NFE")
        spec = self.mapping(value, path, ("options", "space"))
        options = self.options(spec.get("options"), name, f"{path}.options", NESTED.get(name, ()))
        space_path = f"{path}.space"
        entries = spec.get("space") or {}
        if not isinstance(entries, dict):
            self.fail(space_path, f"must be a mapping of option names to {{type: {'|'.join(PARAM_TYPES)}, ...}}")
        space = tuple(self.param(str(p), entry, name, _join(space_path, str(p))) for p, entry in entries.items())
        for p in space:
            *parents, leaf = p.name.split(".")
            fixed = options.get(parents[0], {}) if parents else options
            if leaf in fixed:
                self.fail(_join(space_path, p.name), f"is also fixed under {path}.options; set it in one place")
        return MethodSpec(name, options, space)

    def study(self, data: Any) -> Study:
        d = self.mapping(data, "", TOP_KEYS)
        if "dataset" not in d:
            self.fail("dataset", f"is required; choose one of {', '.join(DATASETS)}")
        dataset = self.choice(d["dataset"], "dataset", DATASETS)
        name = d.get("name", dataset)
        if not isinstance(name, str) or not _NAME.match(name):
            self.fail("name", f"must be a word of letters, digits, '_', '.', '-', got {name!r}")
        solvers = self.names(d.get("solvers"), "solvers", tuple(SOLVERS))
        nfes = self.nfes(d.get("nfes"), solvers)
        order = self.order(d.get("order"), solvers, "order")
        sizes = {**DATA_DEFAULTS, **self.mapping(d.get("data"), "data", tuple(DATA_DEFAULTS))}
        baselines = self.names(d.get("baselines", list(BASELINES)), "baselines", BASELINES, empty=True)
        if "dmn" in baselines:
            for s in solvers:
                if s not in DMN_SOLVERS:
                    self.fail("baselines", f"dmn supports solvers {', '.join(DMN_SOLVERS)}, not {s}; "
                                           "drop dmn or the solver")
        methods = d.get("methods")
        if not isinstance(methods, dict) or not methods:
            self.fail("methods", f"must be a non-empty mapping of methods ({', '.join(SEARCHABLE)}), got {methods!r}")
        context = {"dataset": dataset, "solvers": solvers, "nfes": nfes}
        specs = tuple(self.method(str(m), v, context) for m, v in methods.items())
        res = {**RESOURCE_DEFAULTS, **self.mapping(d.get("resources"), "resources", tuple(RESOURCE_DEFAULTS))}
        return Study(
            name, dataset, self.model(d.get("model"), dataset), solvers, nfes, order, self.teacher(d.get("teacher")),
            *(self.integer(sizes[k], f"data.{k}", 1 if k == "n_train" else 2)
              for k in DATA_DEFAULTS), baselines, specs,
            self.integer(d.get("trials", 10), "trials", 1), self.choice(d.get("sampler", "tpe"), "sampler", SAMPLERS),
            self.integer(d.get("seed", 0), "seed", 0),
            self.number(res["cpus_per_trial"], "resources.cpus_per_trial", 0, strict=True),
            self.number(res["gpus_per_trial"], "resources.gpus_per_trial", 0),
            self.integer(res["max_concurrent"], "resources.max_concurrent", 1),
            self.integer(d.get("max_failures", 0), "max_failures", 0))


def study_from_dict(data: dict, origin: str = "<dict>") -> Study:
    """Validate a study document (the YAML layout); errors name ``origin``."""
    return _Reader(origin).study(data)
