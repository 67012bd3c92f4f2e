"""The study specification of ``ats search``: one YAML file per study (``studies/*.yaml``).

A study names a model, the solvers and NFEs to fit for, the teacher, the data sizes, the
baselines, and for every method its fixed options and its search space. Everything is
validated when the file is loaded, before anything runs: a bad field raises a one-line
``StudyError`` with the file, the field's dotted path and the allowed values. The format is
documented in ``studies/README.md``.
"""
from __future__ import annotations

import copy
import importlib.resources
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

from .atomic import write_atomic
from .discretize import AYS, FIXED, KINDS
from .methods import METHODS, SEARCHABLE, nested_schemas
from .models.base import ModelSource
from .models.sources import DATASETS, get_dataset
from .noise import NoiseSchedule
from .options import (Option, OptionError, choice, did_you_mean, fail, integer, join, mapping, number,
                      parse_options)
from .solvers import MAX_NFE, steps_for_nfe
from .solvers.sampling import SOLVERS, solver_spec
from .teacher import SPLIT_SIZE, TeacherConfig

SAMPLERS = ("tpe", "random", "cmaes", "gp", "qmc")
PARAM_TYPES = ("uniform", "loguniform", "int", "choice")
DEFAULT_BASELINES = FIXED + tuple(name for name, m in METHODS.items() if not m.searchable)
BASELINES = DEFAULT_BASELINES + (AYS,)   # ays: Stable Diffusion-family pipelines (dataset diffusers) only
TOP_KEYS = ("name", "dataset", "model", "solvers", "nfes", "order", "teacher", "data", "baselines", "methods",
            "trials", "sampler", "seed", "resources", "max_failures")
DATA_DEFAULTS = {"n_train": 50, "n_valid": 50, "n_select": 2000, "n_eval": 5000}
RESOURCE_DEFAULTS = {"cpus_per_trial": 1, "gpus_per_trial": 0, "max_concurrent": 1}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StudyError(ValueError):
    """A study that cannot run: the file, the field's dotted path, what is wrong and the fix."""


class _DuplicateKey(yaml.YAMLError):
    """A mapping that gives the same key twice (plain YAML keeps the last one silently)."""

    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"line {line}: key {key!r} is given twice in the same mapping; keep one of them")


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a repeated key in a mapping (merge keys ``<<`` aside)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
        return super().construct_mapping(node, deep)


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
    """A method of the study: fixed options for its fit function and its searched parameters;
    ``n_scored``: score it on the first ``n_scored`` selection and evaluation seeds only (for a
    method whose scoring is a fit per sample, the oracle), None for all of them."""
    name: str
    options: dict
    space: tuple[Param, ...]
    n_scored: int | None = None


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

    def trial_cells(self) -> list[tuple[str, str, int]]:
        """The cell of every trial, in the order the search starts them: ``trials`` rounds over
        the cells, where a method with nothing searched gets one trial per cell (more would
        repeat the same fit)."""
        spaces = {m.name: m.space for m in self.methods}
        return [cell for r in range(self.trials) for cell in self.cells() if r == 0 or spaces[cell[0]]]

    def baseline_cells(self) -> list[tuple[str, str, int]]:
        """(baseline, solver, nfe) for every baseline x solver x NFE."""
        return [(b, s, n) for b in self.baselines for s in self.solvers for n in self.nfes]

    def source(self) -> ModelSource:
        """The study's model source (loads the network)."""
        return get_dataset(self.dataset).source(**self.model)

    def noise_schedule(self) -> NoiseSchedule:
        """The model's noise schedule, without loading the network."""
        return get_dataset(self.dataset).noise_schedule(**self.model)

    def score_name(self) -> str:
        """What ranks the study's schedules: ``FID``, or ``TEACHER_L2`` for a model without an FID reference."""
        return get_dataset(self.dataset).score_name(**self.model)

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
                                 "space": {p.name: p.to_dict() for p in m.space},
                                 **({} if m.n_scored is None else {"n_scored": m.n_scored})}
                        for m in self.methods},
            "trials": self.trials, "sampler": self.sampler, "seed": self.seed,
            "resources": {"cpus_per_trial": self.cpus_per_trial, "gpus_per_trial": self.gpus_per_trial,
                          "max_concurrent": self.max_concurrent},
            "max_failures": self.max_failures,
        }

    def with_overrides(self, model: dict[str, Any] | None = None, **fields: Any) -> Study:
        """A copy with command-line overrides, validated again. Fields: name, solvers, nfes,
        order, baselines, methods (a subset of the study's, by name), n_train, n_valid, n_select, n_eval,
        trials, sampler, seed, cpus_per_trial, gpus_per_trial, max_concurrent, max_failures;
        ``model``: model options of the dataset (preset, guidance_scale, checkpoint, ...). None
        means "not given"."""
        data = self.to_dict()
        groups = {**dict.fromkeys(DATA_DEFAULTS, "data"), **dict.fromkeys(RESOURCE_DEFAULTS, "resources")}
        top = {"name", "solvers", "nfes", "order", "baselines", "trials", "sampler", "seed", "max_failures"}
        for key, value in {**fields, "model": model}.items():
            if value is None:
                continue
            if key == "methods":
                data["methods"] = self._method_subset(value, data["methods"])
            elif key == "model":
                data["model"].update({k: str(v) if isinstance(v, Path) else v for k, v in value.items()})
            elif key in groups:
                data[groups[key]][key] = value
            elif key in top:
                data[key] = list(value) if isinstance(value, tuple) else value
            else:
                allowed = sorted(top | set(groups) | {"methods", "model"})
                _fail("overrides", key, f"cannot be overridden{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}")
        return study_from_dict(data, origin="overrides")

    def _method_subset(self, names: Any, methods: dict[str, Any]) -> dict[str, Any]:
        """``methods`` (the study's, as in ``to_dict``) restricted to ``names``, in the study's order."""
        have = [m.name for m in self.methods]
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
            _fail("overrides", "methods", f"must be a non-empty list of method names from {', '.join(have)}")
        for name in names:
            if name not in have:
                _fail("overrides", "methods", f"{name!r} is not a method of study {self.name}"
                                              f"{did_you_mean(name, have)}; choose from {', '.join(have)}")
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
    except UnicodeDecodeError:
        raise StudyError(f"{path}: not a text file; a study is a YAML file (format: studies/README.md)") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except _DuplicateKey as e:
        raise StudyError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise StudyError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    return study_from_dict(data, origin=str(path))


def shipped_studies() -> list[str]:
    """Names of the studies shipped with ats (the package data ``ats.studies``)."""
    return sorted(p.name[:-5] for p in importlib.resources.files("ats.studies").iterdir() if p.name.endswith(".yaml"))


def study_path(name: str | Path) -> Path:
    """The shipped study ``name`` (``<name>.yaml`` of the package data ``ats.studies``, the
    repository's ``studies/`` folder: a dataset's default, or e.g. ``gmm-per-sample``); a path
    that exists, or ends in .yaml, is taken as it is."""
    if Path(name).exists() or str(name).endswith((".yaml", ".yml")):
        return Path(name)
    path = Path(str(importlib.resources.files("ats.studies") / f"{name}.yaml"))
    if not path.is_file():
        raise StudyError(f"{path}: no shipped study {str(name)!r} (shipped: {', '.join(shipped_studies())}); write one "
                         "(see studies/README.md) and pass it with --study FILE")
    return path


def write_study(study: Study, path: str | Path) -> Path:
    """Write the resolved study as YAML, atomically; ``load_study`` reads it back equal."""
    text = yaml.safe_dump(study.to_dict(), sort_keys=False, default_flow_style=None, width=100)
    return write_atomic(path, lambda tmp: tmp.write_text(text))


# ----------------------------------------------------------------------------- validation

def _fail(origin: str, path: str, message: str) -> NoReturn:
    raise StudyError(f"{origin}: {path}: {message}")


def _bounded(low: float, high: float) -> bool:
    """Whether the range low..high can be sampled: a finite float width, and integer bounds
    within 64 bits (what a study database stores)."""
    if isinstance(low, int) and isinstance(high, int):
        return -2 ** 63 <= low and high < 2 ** 63
    return math.isfinite(high - low)


class _Reader:
    """Validates one study document; every error (``OptionError``) names the field path."""

    # --- the parts of a study

    def model(self, value: Any, dataset: str) -> dict[str, Any]:
        own = DATASETS[dataset].options
        if isinstance(value, dict):
            for key in value:
                other = [d for d, ds in DATASETS.items() if key in ds.options and d != dataset]
                if other and key not in own:
                    fail(f"model.{key}", f"is an option of dataset {other[0]}, not {dataset}; "
                                         f"{dataset} takes: {', '.join(own)}")
            value = {k: str(v) if isinstance(v, Path) else v for k, v in value.items()}
        return DATASETS[dataset].parse(value, "model")

    def names(self, value: Any, path: str, allowed: tuple[str, ...], empty: bool = False) -> tuple[str, ...]:
        if not isinstance(value, list) or (not value and not empty):
            fail(path, f"must be a {'' if empty else 'non-empty '}list of names from {', '.join(allowed)}, "
                       f"got {value!r}")
        out = tuple(choice(v, f"{path}[{i}]", allowed) for i, v in enumerate(value))
        if len(set(out)) != len(out):
            fail(path, f"lists a name twice: {value!r}")
        return out

    def size(self, value: Any, path: str, low: int) -> int:
        """A number of samples: an integer from ``low`` up to the seeds of one split (``SPLIT_SIZE``)."""
        n = integer(value, path, low)
        if n > SPLIT_SIZE:
            fail(path, f"must be at most {SPLIT_SIZE} (the seeds of one split), got {n}")
        return n

    def nfes(self, value: Any, solvers: tuple[str, ...]) -> tuple[int, ...]:
        if not isinstance(value, list) or not value:
            fail("nfes", f"must be a non-empty list of integers >= 1, got {value!r}")
        out = tuple(integer(v, f"nfes[{i}]", 1) for i, v in enumerate(value))
        for i, n in enumerate(out):
            if n > MAX_NFE:
                fail(f"nfes[{i}]", f"must be at most {MAX_NFE} (ats fits few-step schedules), got {n}")
        if len(set(out)) != len(out):
            fail("nfes", f"lists an NFE twice: {value!r}")
        for i, n in enumerate(out):
            for s in solvers:
                if steps_for_nfe(s, n) is None:
                    near = [m for m in (n - 1, n + 1) if m >= 1 and steps_for_nfe(s, m) is not None]
                    fail(f"nfes[{i}]", f"solver {s} cannot spend exactly {n} network calls; "
                                       f"it can spend {' or '.join(map(str, near))}")
        return out

    def order(self, value: Any, solvers: tuple[str, ...], path: str) -> int | None:
        if value is not None:
            integer(value, path, 1)
        for s in solvers:
            try:
                solver_spec(s, value)
            except ValueError as e:
                fail(path, str(e))
        return value

    def teacher(self, value: Any) -> TeacherConfig:
        d = TeacherConfig()
        given = mapping(value, "teacher", ("solver", "nfe", "discretization", "order"))
        t = {"solver": d.solver, "nfe": d.nfe, "discretization": d.discretization, "order": d.order, **given}
        solver = choice(t["solver"], "teacher.solver", tuple(SOLVERS))
        nfe = integer(t["nfe"], "teacher.nfe", 1)
        if steps_for_nfe(solver, nfe) is None:
            fail("teacher.nfe", f"solver {solver} cannot spend exactly {nfe} network calls; use {nfe + 1}")
        return TeacherConfig(solver, nfe, choice(t["discretization"], "teacher.discretization", KINDS),
                             self.order(t["order"], (solver,), "teacher.order"))

    def param_option(self, method: str, name: str, path: str) -> Option:
        """The option a (dotted) parameter name sets."""
        nested, parts = METHODS[method].nested, name.split(".")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] not in nested):
            hint = f"nested names are {', '.join(n + '.OPTION' for n in nested)}" if nested \
                else f"{method} has no nested options"
            fail(path, f"unknown parameter; {hint}")
        owner = parts[0] if len(parts) == 2 else method
        options = nested_schemas(METHODS[method])[owner] if len(parts) == 2 else METHODS[owner].options
        if parts[-1] not in options:
            fail(path, f"{parts[-1]!r} is not an option of {owner}{did_you_mean(parts[-1], options)}; "
                       f"options: {', '.join(options)}")
        return options[parts[-1]]

    def param(self, name: str, entry: Any, method: str, path: str) -> Param:
        option = self.param_option(method, name, path)
        leaf, kinds = option.name, option.kinds
        if not isinstance(entry, dict) or "type" not in entry:
            fail(path, f"must be a mapping with a type ({', '.join(PARAM_TYPES)}), got {entry!r}")
        kind = choice(entry["type"], f"{path}.type", PARAM_TYPES)
        keys = {"uniform": ("low", "high"), "loguniform": ("low", "high"), "int": ("low", "high", "log"),
                "choice": ("values",)}[kind]
        mapping(entry, path, ("type",) + keys)
        for key in keys:
            if key not in entry and key != "log":
                fail(join(path, key), f"is required for type {kind}")
        if kind == "choice":
            values = entry["values"]
            if not isinstance(values, list) or not values:
                fail(f"{path}.values", f"must be a non-empty list, got {values!r}")
            if "pair" in kinds:
                fail(path, f"{leaf} is a pair and cannot be searched; fix it under options")
            out = tuple(option.parse(v, f"{path}.values[{i}]") for i, v in enumerate(values))
            if len(set(out)) != len(out):
                fail(f"{path}.values", f"lists a value twice: {values!r}")
            return Param(name, kind, values=out)
        if kind == "int":
            if "int" not in kinds:
                other = "uniform or loguniform" if "float" in kinds else "choice"
                fail(f"{path}.type", f"{leaf} takes {'/'.join(sorted(kinds))}, not an integer; use type {other}")
            low, high = (integer(entry[k], f"{path}.{k}") for k in ("low", "high"))
            log = entry.get("log", False)
            if not isinstance(log, bool):
                fail(f"{path}.log", f"must be true or false, got {log!r}")
            if log and low < 1:
                fail(f"{path}.low", f"must be >= 1 for a log-scaled int parameter, got {low}")
        else:
            if "float" not in kinds:
                fail(f"{path}.type", f"{leaf} takes {'/'.join(sorted(kinds))}, not a float; "
                                     f"use type {'int' if 'int' in kinds else 'choice'}")
            low, high = (float(number(entry[k], f"{path}.{k}")) for k in ("low", "high"))
            log = False
            if kind == "loguniform" and low <= 0:
                fail(f"{path}.low", f"must be > 0 for a loguniform parameter, got {low:g}")
        if not _bounded(low, high):
            fail(path, "the range low..high is too wide to sample; integer bounds must lie within "
                       "-2**63..2**63 - 1 and a float range must have a finite width")
        if low >= high:
            fail(f"{path}.low", f"must be below high ({high:g}), got {low:g}")
        option.parse(low, f"{path}.low")   # the range lies within the option's bounds
        return Param(name, kind, low, high, log)

    def method(self, name: str, value: Any, study: dict[str, Any]) -> MethodSpec:
        path = f"methods.{name}"
        if name in METHODS and not METHODS[name].searchable:
            fail(path, f"{name} has nothing to search; list it under baselines")
        if name not in SEARCHABLE:
            fail(path, f"unknown method{did_you_mean(name, SEARCHABLE)}; choose from {', '.join(SEARCHABLE)}")
        method = METHODS[name]
        reason = method.unsupported(study["solvers"], study["steps"], DATASETS[study["dataset"]].has_real_data)
        if reason:
            fail(path, reason)
        spec = mapping(value, path, ("options", "space", "n_scored"))
        n_scored = spec.get("n_scored")
        if n_scored is not None:
            integer(n_scored, f"{path}.n_scored", 2)
        options = parse_options(method.options, spec.get("options"), f"{path}.options", nested_schemas(method))
        space_path = f"{path}.space"
        entries = spec.get("space") or {}
        if not isinstance(entries, dict):
            fail(space_path, f"must be a mapping of option names to {{type: {'|'.join(PARAM_TYPES)}, ...}}")
        space = tuple(self.param(str(p), entry, name, join(space_path, str(p))) for p, entry in entries.items())
        for p in space:
            *parents, leaf = p.name.split(".")
            fixed = options.get(parents[0], {}) if parents else options
            if leaf in fixed:
                fail(join(space_path, p.name), f"is also fixed under {path}.options; set it in one place")
        searched = {v for p in space if p.name == "precision" for v in p.values or ()}
        if not study["gpus"] and "fp16" in {options.get("precision"), *searched}:
            fail(f"{path}.{'options' if options.get('precision') == 'fp16' else 'space'}.precision",
                 "fp16 needs CUDA and this study's trials get no GPU (resources.gpus_per_trial is 0); "
                 "use bf16 or fp32")
        return MethodSpec(name, options, space, n_scored)

    def study(self, data: Any) -> Study:
        d = mapping(data, "", TOP_KEYS)
        if "dataset" not in d:
            fail("dataset", f"is required; choose one of {', '.join(DATASETS)}")
        dataset = choice(d["dataset"], "dataset", tuple(DATASETS))
        name = d.get("name", dataset)
        if not isinstance(name, str) or not _NAME.match(name):
            fail("name", f"must be a word of letters, digits, '_', '.', '-', got {name!r}")
        solvers = self.names(d.get("solvers"), "solvers", tuple(SOLVERS))
        nfes = self.nfes(d.get("nfes"), solvers)
        steps = [steps_for_nfe(s, n) for s in solvers for n in nfes]
        has_real_data = DATASETS[dataset].has_real_data
        sizes = {**DATA_DEFAULTS, **mapping(d.get("data"), "data", tuple(DATA_DEFAULTS))}
        baselines = self.names(d.get("baselines", list(DEFAULT_BASELINES)), "baselines", BASELINES, empty=True)
        if AYS in baselines and dataset != "diffusers":
            fail("baselines", f"ays (Align Your Steps) has reference schedules for Stable Diffusion-family pipelines "
                              f"only (dataset diffusers), not {dataset}; drop ays")
        for b in baselines:
            reason = METHODS[b].unsupported(solvers, steps, has_real_data) if b in METHODS else None
            if reason:
                fail("baselines", f"{reason}; drop {b} or the solver")
        methods = d.get("methods")
        if not isinstance(methods, dict) or not methods:
            fail("methods", f"must be a non-empty mapping of methods ({', '.join(SEARCHABLE)}), got {methods!r}")
        res = {**RESOURCE_DEFAULTS, **mapping(d.get("resources"), "resources", tuple(RESOURCE_DEFAULTS))}
        gpus = number(res["gpus_per_trial"], "resources.gpus_per_trial", 0)
        context = {"dataset": dataset, "solvers": solvers, "steps": steps, "gpus": gpus}
        return Study(
            name=name, dataset=dataset, model=self.model(d.get("model"), dataset), solvers=solvers, nfes=nfes,
            order=self.order(d.get("order"), solvers, "order"), teacher=self.teacher(d.get("teacher")),
            **{k: self.size(sizes[k], f"data.{k}", 1 if k == "n_train" else 2) for k in DATA_DEFAULTS},
            baselines=baselines, methods=tuple(self.method(str(m), v, context) for m, v in methods.items()),
            trials=integer(d.get("trials", 10), "trials", 1),
            sampler=choice(d.get("sampler", "tpe"), "sampler", SAMPLERS),
            seed=integer(d.get("seed", 0), "seed", 0),
            cpus_per_trial=number(res["cpus_per_trial"], "resources.cpus_per_trial", 0, strict=True),
            gpus_per_trial=gpus,
            max_concurrent=integer(res["max_concurrent"], "resources.max_concurrent", 1),
            max_failures=integer(d.get("max_failures", 0), "max_failures", 0))


def study_from_dict(data: dict, origin: str = "<dict>") -> Study:
    """Validate a study document (the YAML layout); errors name ``origin``."""
    try:
        return _Reader().study(data)
    except OptionError as e:
        raise StudyError(f"{origin}: {e}") from None
