"""The ``ats`` command line: every verb is a thin call into the ``ats`` library."""
from __future__ import annotations

import functools
from pathlib import Path

import click

from ats.discretize import FIXED, KINDS
from ats.evaluate import EVAL_SAMPLES, L2_SAMPLES
from ats.methods import METHODS
from ats.solvers import MAX_NFE
from ats.teacher import DEFAULT_CACHE, SPLIT_SIZE
from ats.models.sources import DATASETS
from ats.solvers import SOLVERS
from ats.study import BASELINES, DEFAULT_BASELINES, SAMPLERS


def _int_list(ctx, param, value: str) -> list[int]:
    try:
        values = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}")
    if not values or min(values) < 1 or max(values) > MAX_NFE:
        raise click.BadParameter(f"give integers from 1 to {MAX_NFE}")
    return values


def _choice_list(choices):
    def parse(ctx, param, value: str) -> list[str]:
        values = [v.strip() for v in value.split(",") if v.strip()]
        bad = [v for v in values if v not in choices]
        if not values:
            raise click.BadParameter(f"give at least one of {', '.join(choices)}")
        if bad:
            raise click.BadParameter(f"{', '.join(bad)} not among {', '.join(choices)}")
        return values
    return parse


def _writable_file(ctx, param, value: Path | None) -> Path | None:
    """A file path whose folder exists and is writable, checked before any work starts."""
    if value is not None:
        import os
        folder = value.parent if str(value.parent) else Path(".")
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise click.BadParameter(f"cannot write {value}: {folder} is not a writable folder; create it or "
                                     "choose another path")
    return value


def json_option(what: str):
    """``--json FILE``: also write ``what`` as JSON (the folder is checked before any work)."""
    return click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
                        callback=_writable_file, help=f"Also write {what} as JSON.")


def _dataset_flags() -> dict[str, dict[str, str]]:
    """Every dataset's model options as CLI flags: flag -> {dataset: option name}."""
    flags: dict[str, dict[str, str]] = {}
    for ds in DATASETS.values():
        for name in ds.options:
            flags.setdefault("--" + ds.flags.get(name, name).replace("_", "-"), {})[ds.name] = name
    return flags


DATASET_FLAGS = _dataset_flags()


def _flag_type(option):
    if option.choices:
        return click.Choice(option.choices)
    return int if "int" in option.kinds else float if "float" in option.kinds else str


def model_flags(f):
    """Every dataset's model options as flags, passed on as ``model_flags`` ({flag: value}, given ones)."""
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        given = {flag: kwargs.pop(flag[2:].replace("-", "_")) for flag in DATASET_FLAGS}
        return f(*args, model_flags={k: v for k, v in given.items() if v is not None}, **kwargs)
    for flag, owners in reversed(DATASET_FLAGS.items()):
        ds, name = next(iter(owners.items()))
        option = DATASETS[ds].options[name]
        helps = " ".join(dict.fromkeys(DATASETS[d].options[n].help for d, n in owners.items()))
        wrapper = click.option(flag, type=_flag_type(option), default=None, help=helps)(wrapper)
    return wrapper


def model_options(dataset: str, flags: dict) -> dict:
    """The given model flags as ``dataset``'s options; a flag of another dataset is an error."""
    model = {}
    for flag, value in flags.items():
        owners = DATASET_FLAGS[flag]
        if dataset not in owners:
            raise click.UsageError(f"{flag} is an option of dataset{'s' if len(owners) > 1 else ''} "
                                   f"{', '.join(owners)}, not {dataset}")
        model[owners[dataset]] = value
    return model


def dataset_options(default: str = "gmm"):
    """--dataset and the model flags, turned into the ``source`` argument."""
    def decorate(f):
        @model_flags
        @functools.wraps(f)
        def wrapper(*args, dataset, model_flags, **kwargs):
            from ats.models.sources import load_source
            try:
                source = load_source(dataset, **model_options(dataset, model_flags))
            except (ValueError, FileNotFoundError, ImportError) as e:
                raise click.UsageError(str(e))
            return f(*args, source=source, **kwargs)
        return click.option("--dataset", default=default, show_default=True, type=click.Choice(tuple(DATASETS)),
                            help="Model source: gmm (analytic), digits (shipped U-Net), cifar10 (--checkpoint), "
                                 "diffusers (--checkpoint: any diffusers UNet2DModel or latent pipeline folder)."
                            )(wrapper)
    return decorate


@click.group()
@click.version_option(package_name="ats")
def main() -> None:
    """ats: adaptive timestep schedules for few-step diffusion sampling."""


@main.command()
@dataset_options()
@click.option("--solvers", default="ddim,dpm_solver++,uni_pc,ipndm,heun", show_default=True,
              callback=_choice_list(tuple(SOLVERS)), help="Comma-separated solvers.")
@click.option("--nfe", "nfes", default="3,5,7,10", show_default=True, callback=_int_list,
              help="Comma-separated numbers of network evaluations.")
@click.option("--discretizations", default=",".join(FIXED), show_default=True,
              callback=_choice_list(KINDS), help="Comma-separated fixed discretizations.")
@click.option("--metric", type=click.Choice(["l2", "fid"]), default="l2", show_default=True,
              help="l2: mean distance to a 1000-step reference from the same noise; fid: the dataset's FID.")
@click.option("--n", "n_samples", default=512, show_default=True, type=click.IntRange(2, SPLIT_SIZE),
              help="Number of samples (evaluation seeds).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="First evaluation sample.")
@json_option("one object per row (value, 95 % interval, n; for FID the paired change against the best "
             "discretization of its solver and NFE)")
def compare(source, solvers, nfes, discretizations, metric, n_samples, seed, json_path) -> None:
    """Every fixed discretization per solver and NFE, by distance to a reference or by FID,
    with 95 % intervals (the best of each row in bold)."""
    from ats.report import console as report_console
    from rich.progress import track
    from rich.table import Table

    from ats.compare import evaluate_table, reference_solution
    from ats.evaluate import seed_set
    from ats.teacher import split_seeds

    seeds = split_seeds("eval", n_samples, seed)
    x = source.latents(seeds, dtype=source.dtype)
    labels = source.labels(seeds)
    console = report_console()
    if metric == "l2":
        with console.status("reference solution (UniPC-3, 1000 steps)"):
            reference = reference_solution(source, x, labels)
        score, title = reference, "mean L2 error to the reference"
    else:
        from ats.metrics import TeacherDistance
        with console.status("FID reference statistics"):
            score = source.make_metric()
        if isinstance(score, TeacherDistance):
            raise click.UsageError(f"{source.name} has no FID reference: pass --fid-reference, or use --metric l2 "
                                   "(the distance to a 1000-step reference solution)")
        title = "FID" if len(source.shape) == 3 else "Frechet distance"
    total = len(solvers) * len(nfes) * len(discretizations)
    rows = list(track(evaluate_table(source, x, labels, score, solvers, nfes, discretizations,
                                     seed_set("eval", n_samples, seed)), total=total,
                      description="sampling", console=console, transient=True))
    table = Table(title=f"{source.name}: {title} ± 95 % interval, {n_samples} evaluation samples "
                        f"({seed}..{seed + n_samples - 1})",
                  caption="bold: the lowest of its row")
    table.add_column("solver")
    table.add_column("NFE", justify="right")
    for kind in discretizations:
        table.add_column(kind, justify="right")
    records = []
    for solver in solvers:
        for n in nfes:
            cells = {r.discretization: r for r in rows if r.solver == solver and r.nfe == n}
            if not cells:
                continue
            best = min(cells.values(), key=lambda r: r.value if r.value == r.value else float("inf"))
            texts = {k: "diverged" if r.value != r.value else f"{r.value:.4g} ± {(r.high - r.low) / 2:.2g}"
                     for k, r in cells.items()}
            table.add_row(solver, str(n), *(f"[bold]{texts[k]}[/bold]" if cells[k] is best else texts[k]
                                            for k in discretizations))
            for k, r in cells.items():
                record = {"name": k, "solver": solver, "nfe": n, metric: r.value, f"{metric}_low": r.low,
                          f"{metric}_high": r.high, "n": n_samples, "seeds": seed_set("eval", n_samples, seed)}
                if r.fid is not None and best.fid is not None and r is not best:
                    c = r.fid.change_pct(best.fid)
                    record.update(reference=best.discretization, vs_best_baseline_pct=c.pct,
                                  vs_best_baseline_low=c.low, vs_best_baseline_high=c.high)
                records.append(record)
    console.print(table)
    skipped = sorted({(r, n) for r in solvers for n in nfes} - {(r.solver, r.nfe) for r in rows})
    for solver, n in skipped:
        console.print(f"{solver}: NFE {n} skipped (Heun's N steps cost 2N - 1 calls, so its NFE is odd)")
    if json_path is not None:
        import json
        import math

        from ats.atomic import write_atomic
        clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                 for r in records]
        write_atomic(json_path, lambda tmp: tmp.write_text(json.dumps(clean, indent=2) + "\n"))
        console.print(f"rows written to {json_path}")


@main.command("train-model")
@click.option("--dataset", type=click.Choice(["digits"]), default="digits", show_default=True)
@click.option("--classifier", is_flag=True, help="Train the FID feature classifier instead of the U-Net.")
@click.option("--steps", default=12000, show_default=True, type=click.IntRange(1), help="U-Net training steps.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Where to write the weights (default: the shipped file inside the package).")
def train_model(dataset, classifier, steps, seed, out) -> None:
    """Train the embedded digits U-Net (CPU, about 10 minutes) or its FID classifier."""
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from ats.models import digits

    start = time.perf_counter()
    if classifier:
        model, accuracy = digits.train_digits_classifier(seed=seed)
        path = out or digits.DIGITS_CLASSIFIER
        digits.save_atomic({"state_dict": model.state_dict(),
                            "meta": {"held_out_accuracy": accuracy, "seed": seed}}, path)
        click.echo(f"digits classifier: held-out accuracy {accuracy:.2%}, written to {path}")
        return
    with Progress(TextColumn("training digits U-Net"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn()) as bar:
        task = bar.add_task("train", total=steps, loss=float("nan"))
        model = digits.train_digits_unet(steps=steps, seed=seed,
                                         progress=lambda step, loss: bar.update(task, advance=1, loss=loss))
    path = out or digits.DIGITS_UNET
    digits.save_digits_unet(model, path, steps=steps, seed=seed, seconds=round(time.perf_counter() - start))
    click.echo(f"digits U-Net written to {path} ({time.perf_counter() - start:.0f} s)")


@main.command()
@dataset_options(default="digits")
@click.option("--solver", default="uni_pc", show_default=True, type=click.Choice(tuple(SOLVERS)))
@click.option("--order", default=None, type=int, help="Solver order (default: the solver's).")
@click.option("--nfe", default=20, show_default=True, type=click.IntRange(1, MAX_NFE))
@click.option("--discretization", default="edm", show_default=True, type=click.Choice(KINDS))
@click.option("--n", "n_samples", default=1000, show_default=True, type=click.IntRange(1, SPLIT_SIZE))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0),
              help="First sample of the split (sample i has its own seed).")
@click.option("--split", default="train", show_default=True, type=click.Choice(["train", "valid", "eval"]))
@click.option("--cache", type=click.Path(path_type=Path), default=Path(DEFAULT_CACHE), show_default=True)
@click.option("--grid", type=click.Path(path_type=Path), default=None, help="Also write a PNG grid of the targets.")
def teacher(source, solver, order, nfe, discretization, n_samples, seed, split, cache, grid) -> None:
    """Teacher targets x0* for n samples, cached on disk (resumable; a rerun computes nothing)."""
    from rich.progress import Progress

    from ats.teacher import TeacherConfig, generate_teacher, split_seeds, teacher_dir

    config = TeacherConfig(solver=solver, nfe=nfe, discretization=discretization, order=order)
    try:
        seeds = split_seeds(split, n_samples, seed)
        config.timesteps(source)
        with Progress() as bar:
            task = bar.add_task(f"teacher {solver} NFE {nfe} {discretization}", total=n_samples)
            data = generate_teacher(source, seeds, config, cache, dtype=source.dtype,
                                    progress=lambda k: bar.update(task, advance=k))
    except ValueError as e:
        raise click.UsageError(str(e))
    click.echo(f"{len(data.seeds)} targets ({split} seeds {seeds.start}..{seeds.stop - 1}) in "
               f"{teacher_dir(source, config, cache, source.dtype)}")
    if grid is not None:
        if len(source.shape) != 3:
            raise click.UsageError(f"--grid needs an image dataset; {source.name} samples are points")
        from ats.plots import save_image_grid
        click.echo(f"grid: {save_image_grid(source.images(data.targets[:64]), grid)}")


def check_out_folder(out: Path) -> None:
    """Before a fit: ``--out`` is a folder that holds no result yet (a finished result is never
    overwritten) and can be created or written."""
    import os

    if out.exists() and not out.is_dir():
        raise click.BadParameter(f"{out} is a file, not a folder; choose another folder", param_hint="--out")
    old = [name for name in ("result.pt", "schedule.json") if (out / name).exists()]
    if old:
        raise click.BadParameter(f"{out} already holds a result ({', '.join(old)}); choose another folder or "
                                 f"delete {out}", param_hint="--out")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise click.BadParameter(f"cannot create or write {out}: {existing} is not a writable folder; choose "
                                 "another folder", param_hint="--out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise click.BadParameter(f"cannot create {out} ({e.strerror}); choose another folder", param_hint="--out")


def interrupted_note(method: str, info: dict, path: Path) -> str:
    """What ``ats fit`` saved when Ctrl-C stopped it (``info`` of the result): the method's best
    state, or for a method that starts from LD3 and was stopped there, LD3's."""
    if info.get("interrupted_in") == "ld3_start":
        return (f"interrupted while fitting the starting LD3 schedule of {method}: LD3's best state saved to {path} "
                f"(an ld3 schedule; rerun to fit {method})")
    return f"interrupted: the best state of {method} so far saved to {path}"


@main.command()
@click.option("--method", required=True, type=click.Choice(tuple(METHODS)), help="What to fit (README: Methods).")
@dataset_options(default="digits")
@click.option("--solver", default="uni_pc", show_default=True, type=click.Choice(tuple(SOLVERS)))
@click.option("--order", default=None, type=int, help="Solver order (default: the solver's).")
@click.option("--nfe", default=5, show_default=True, type=click.IntRange(1, MAX_NFE))
@click.option("--n-train", default=50, show_default=True, type=click.IntRange(1, SPLIT_SIZE),
              help="Training samples (seeds).")
@click.option("--n-valid", default=50, show_default=True, type=click.IntRange(2, SPLIT_SIZE),
              help="Validation samples.")
@click.option("--n-eval", default=EVAL_SAMPLES, show_default=True, type=click.IntRange(2, SPLIT_SIZE),
              help="Evaluation samples for the closing comparison (fresh seeds).")
@click.option("--teacher-solver", default="uni_pc", show_default=True, type=click.Choice(tuple(SOLVERS)))
@click.option("--teacher-nfe", default=20, show_default=True, type=click.IntRange(1))
@click.option("--teacher-discretization", default="edm", show_default=True, type=click.Choice(KINDS))
@click.option("--option", "raw_options", multiple=True, metavar="KEY=VALUE",
              help="A method option, e.g. --option epochs=200 --option loss=pseudo_huber (repeatable).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--cache", type=click.Path(path_type=Path), default=Path(DEFAULT_CACHE), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder (default runs/<method>-<dataset>-<solver>-nfe<N>).")
@json_option("the closing comparison's rows (FID, 95 % interval, paired change against the best baseline)")
def fit(method, source, solver, order, nfe, n_train, n_valid, n_eval, teacher_solver, teacher_nfe,
        teacher_discretization, raw_options, seed, cache, out, json_path) -> None:
    """Fit one method (one run, no Ray) and compare it with the fixed discretizations."""
    import json

    from ats.report import console as report_console

    from ats.methods import FitDiverged, OptionError, fit_method, parse_method_options, save_result, save_schedule_json
    from ats.teacher import TeacherConfig

    options = {}
    for item in raw_options:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--option")
        if key in options:
            raise click.BadParameter(f"{key} is given twice; keep one", param_hint="--option")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    try:
        options = parse_method_options(method, options, path="")
    except OptionError as e:
        raise click.BadParameter(f"{e} (method {method})", param_hint="--option")
    out = out or Path("runs") / f"{method}-{source.name}-{solver}-nfe{nfe}"
    check_out_folder(out)
    console = report_console()
    teacher = TeacherConfig(teacher_solver, teacher_nfe, teacher_discretization)
    try:
        with console.status(f"fitting {method} ({solver}, NFE {nfe}) on {source.name}") as status:
            def progress(phase: str, step: int, loss: float) -> None:
                status.update(f"fitting {method} ({solver}, NFE {nfe}) on {source.name}: {phase} {step}, "
                              f"loss {loss:.4g}")
            result = fit_method(method, source, solver, nfe, order, n_train, n_valid, teacher, cache, seed, options,
                                progress=progress)
    except KeyboardInterrupt:
        console.print(f"interrupted before {method} had a state to save: nothing saved (teacher targets computed "
                      f"so far stay cached in {cache})")
        raise SystemExit(130)
    except FitDiverged as e:
        if getattr(e, "result", None) is not None:
            save_result(e.result, out / "result.pt")
            console.print(f"best state before the failure saved to {out / 'result.pt'}")
        raise click.ClickException(str(e))
    except ValueError as e:
        raise click.UsageError(str(e))
    save_result(result, out / "result.pt")
    if result.timesteps is not None:
        save_schedule_json(result, out / "schedule.json")
    if result.info.get("interrupted"):
        console.print(interrupted_note(method, result.info, out / "result.pt"))
        raise SystemExit(130)
    from ats.evaluate import evaluate_result
    from ats.report import verdict, write_json
    table, rows = evaluate_result(source, result, n_eval, teacher, cache)
    console.print(table)
    console.print(verdict(rows))
    if json_path is not None:
        console.print(f"rows written to {write_json(rows, json_path)}")
    console.print(f"saved to {out}")


@main.command()
@click.option("--dataset", default=None, help="Run studies/DATASET.yaml (gmm, digits, cifar10).")
@click.option("--study", "study_file", type=click.Path(path_type=Path), default=None,
              help="Any other study YAML, or a shipped study by name (gmm-per-sample, digits-per-sample).")
@click.option("--resume", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Finish the study in this folder (written by an earlier `ats search`).")
@click.option("--solver", "solvers", default=None, callback=lambda c, p, v: v and _choice_list(tuple(SOLVERS))(c, p, v),
              help="Override the study's solvers (comma-separated).")
@click.option("--nfe", "nfes", default=None, callback=lambda c, p, v: v and _int_list(c, p, v),
              help="Override the study's NFEs (comma-separated).")
@click.option("--methods", default=None, help="Only these of the study's methods (comma-separated).")
@click.option("--trials", type=click.IntRange(1), default=None, help="Trials per method, solver and NFE.")
@click.option("--sampler", type=click.Choice(SAMPLERS), default=None, help="Optuna sampler.")
@click.option("--n-train", type=click.IntRange(1), default=None)
@click.option("--n-valid", type=click.IntRange(2), default=None, help="The methods' own validation samples.")
@click.option("--n-select", type=click.IntRange(2), default=None,
              help="Samples whose FID ranks the trials and the baselines.")
@click.option("--n-eval", type=click.IntRange(2), default=None, help="Held-out samples of the final table.")
@click.option("--seed", type=int, default=None)
@click.option("--cpus-per-trial", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option("--gpus-per-trial", type=click.FloatRange(min=0), default=None, help="Fractions allowed, e.g. 0.5.")
@click.option("--max-concurrent", type=click.IntRange(1), default=None, help="Trials running at once.")
@click.option("--max-failures", type=click.IntRange(0), default=None, help="Retries of a crashed trial.")
@model_flags
@click.option("--tracking-uri", default=None,
              help="MLflow tracking URI (http://host:5000 for `ats server`); default a local sqlite ./mlflow.db.")
@click.option("--optuna-storage", default=None,
              help="Optuna storage: an RDB URL (sqlite:///..., postgresql://...) or a journal file (*.log); "
                   "default sqlite in the study folder.")
@click.option("--address", default=None,
              help="Ray cluster address (`auto` for the running cluster; or RAY_ADDRESS); default a new local Ray instance.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs"), show_default=True,
              help="Where study folders go (must be shared storage on a cluster).")
@click.option("--cache", type=click.Path(path_type=Path), default=Path(DEFAULT_CACHE), show_default=True)
@click.option("--no-live", is_flag=True, help="Print a line per finished trial instead of a live table.")
def search(dataset, study_file, resume, solvers, nfes, methods, trials, sampler, n_train, n_valid, n_select, n_eval,
           seed,
           cpus_per_trial, gpus_per_trial, max_concurrent, max_failures, model_flags, tracking_uri, optuna_storage, address, out, cache, no_live) -> None:
    """Search schedules for a study: Ray Tune trials, Optuna hyperparameters, MLflow runs."""
    from ats.study import StudyError, load_study, study_path
    from ats.tracking import TrackingError
    from ats.trial import check_inputs

    if sum(x is not None for x in (dataset, study_file, resume)) != 1:
        raise click.UsageError("give one of --dataset NAME, --study FILE or --resume STUDY_DIR")
    overrides = {k: v for k, v in dict(
        solvers=solvers and tuple(solvers), nfes=nfes and tuple(nfes), trials=trials, sampler=sampler,
        n_train=n_train, n_valid=n_valid, n_select=n_select, n_eval=n_eval, seed=seed, cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial, max_concurrent=max_concurrent, max_failures=max_failures,
        methods=methods and tuple(m.strip() for m in methods.split(",") if m.strip())).items() if v is not None}
    try:
        if resume is not None:
            if overrides or model_flags:
                raise click.UsageError(f"--resume continues the study as it was; drop "
                                       f"{', '.join([*overrides, *model_flags])}")
            if not (resume / "study.yaml").is_file() or not (resume / "state.json").is_file():
                raise click.UsageError(f"{resume} is not a study folder of `ats search` (it lacks study.yaml or "
                                       "state.json); give the folder a search printed (runs/<study>-<date>-<time>)")
            from ats.tune import SearchState
            SearchState.load(resume)
            study = load_study(resume / "study.yaml")
        else:
            study = load_study(study_path(study_file or dataset))
            study = study.with_overrides(model=model_options(study.dataset, model_flags), **overrides)
        check_inputs(study)
    except (StudyError, FileNotFoundError, ValueError, ImportError) as e:
        raise click.UsageError(str(e))
    from ats import tune
    try:
        folder = resume or tune.new_study_dir(out, study)
        _, interrupted = tune.search(study, folder, tracking_uri, optuna_storage, address,
                                     resume=resume is not None, cache=cache, live=not no_live)
    except (TrackingError, tune.SearchError) as e:
        raise click.ClickException(str(e))
    if interrupted:
        raise SystemExit(130)


@main.command()
@click.option("--backend-store-uri", default="sqlite:///mlflow.db", show_default=True,
              help="Where runs are stored: sqlite:///file.db or postgresql://user:pass@host/db.")
@click.option("--artifacts-destination", default="./mlartifacts", show_default=True,
              help="Artifact root (a folder, or s3://... on a cluster); clients upload through the server.")
@click.option("--host", default="127.0.0.1", show_default=True, help="0.0.0.0 to serve a Ray cluster's nodes.")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1))
def server(backend_store_uri, artifacts_destination, host, port, workers) -> None:
    """Start an MLflow tracking server (then: ats search --tracking-uri http://HOST:PORT)."""
    import os

    from ats.tracking import TrackingError, check_port_free, exposed_warning, serve
    try:
        args = serve(backend_store_uri, artifacts_destination, host, port, workers)
        warning = exposed_warning(host)
        if warning:
            click.echo(f"warning: {warning}", err=True)
        check_port_free(host, port)
    except TrackingError as e:
        raise click.ClickException(str(e))
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")   # GenAI job workers: not used by ats
    click.echo(f"MLflow tracking server on http://{host}:{port} (backend {backend_store_uri}, "
               f"artifacts {artifacts_destination})")
    os.execvp(args[0], args)


def _fit_options(f):
    """--run / --schedule and --tracking-uri of `ats evaluate` and `ats sample`; the dataset
    options apply to --schedule (a run's model comes from its study)."""
    @click.option("--run", "run_id", default=None, help="MLflow run id of a trial or baseline of `ats search`.")
    @click.option("--schedule", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
                  help="A schedule.json or result.pt written by `ats fit` or `ats search`, with --dataset and its "
                       "options.")
    @dataset_options(default="digits")
    @click.option("--tracking-uri", default=None,
                  help="MLflow tracking URI of --run; default $MLFLOW_TRACKING_URI or a local sqlite ./mlflow.db.")
    @click.option("--cache", type=click.Path(path_type=Path), default=Path(DEFAULT_CACHE), show_default=True)
    @functools.wraps(f)
    def wrapper(*args, run_id, schedule, source, tracking_uri, **kwargs):
        from ats.evaluate import check_fits, load_schedule_file

        if (run_id is None) == (schedule is None):
            raise click.UsageError("give one of --run RUN_ID or --schedule FILE")
        ctx = click.get_current_context()
        given = [f"--{p.replace('_', '-')}" for p in ["dataset"] + [f[2:].replace("-", "_") for f in DATASET_FLAGS]
                 if ctx.get_parameter_source(p) is not click.core.ParameterSource.DEFAULT]
        study = None
        if run_id is not None:
            from ats.tracking import TrackingError, load_result, load_run_study
            if given:
                raise click.UsageError(f"{', '.join(given)} go with --schedule; a run's model comes from its study")
            try:
                study = load_run_study(run_id, tracking_uri)   # first: says clearly what a wrong id is
                result = load_result(run_id, tracking_uri)
            except TrackingError as e:
                raise click.ClickException(str(e))
            except ValueError as e:
                raise click.ClickException(f"run {run_id}: its result artifact is unusable: {e}")
            source = study.source()
        else:
            try:
                result = load_schedule_file(schedule)   # its errors name the file
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="--schedule")
        try:
            check_fits(source, result)
        except (ValueError, KeyError, RuntimeError) as e:
            raise click.UsageError(f"{schedule or run_id}: {e}")
        return f(*args, result=result, source=source, study=study, run_id=run_id, tracking_uri=tracking_uri,
                 **kwargs)
    return wrapper


@main.command()
@_fit_options
@click.option("--n", "n_samples", default=None, type=click.IntRange(2, SPLIT_SIZE),
              help=f"Evaluation samples (fresh seeds); default: the study's n_eval (--run), {EVAL_SAMPLES} "
                   "(--schedule). The FID interval narrows like 1/sqrt(n).")
@click.option("--start", default=None, type=click.IntRange(0),
              help="First evaluation sample; default: just past the study's evaluation seeds (--run), 0 (--schedule: "
                   "the seeds `ats fit` compared on).")
@click.option("--baselines", default=None,
              callback=lambda c, p, v: None if v is None else _choice_list(BASELINES)(c, p, v),
              help="Comma-separated baselines; default: the study's (--run), all of them (--schedule).")
@json_option("the rows (FID, 95 % interval, paired change against the best baseline)")
def evaluate(result, source, study, run_id, tracking_uri, cache, n_samples, start, baselines, json_path) -> None:
    """FID of a run's (or a file's) schedule or predictor against the baselines, on fresh seeds,
    with 95 % intervals and paired changes."""
    from ats.report import console as report_console
    from rich.progress import Progress

    from ats.evaluate import baseline_problem, check_baselines, compare_on_eval, run_metrics, teacher_count
    from ats.report import rich_table, verdict, write_json
    from ats.teacher import TeacherConfig

    if result.tied_to_seeds:
        raise click.UsageError("oracle schedules were fitted on each of their own samples, so they have no FID on "
                               "fresh seeds (that takes a new oracle fit); their FID on the seeds they belong to "
                               "is the run's fid_eval metric")
    start = (study.n_eval if study else 0) if start is None else start
    n_samples = n_samples or (study.n_eval if study else EVAL_SAMPLES)
    names = [b for b in (baselines or (study.baselines if study else DEFAULT_BASELINES)) if b != result.method]
    console = report_console()
    if baselines:
        try:
            check_baselines(source, result, names)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--baselines")
    for name in [b for b in names if baseline_problem(source, result, b)]:
        console.print(f"baseline {name} left out: {baseline_problem(source, result, name)}")
        names.remove(name)
    try:
        metric = source.make_metric()
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise click.UsageError(str(e))
    with Progress(console=console, transient=True) as bar:
        tasks = {"teacher": bar.add_task("teacher targets", total=teacher_count(metric, n_samples)),
                 "sampling": bar.add_task(f"sampling {n_samples} per schedule", total=len(names) + 1)}
        try:
            rows = compare_on_eval(source, result, n_samples, study.teacher if study else TeacherConfig(), cache,
                                   start, names, study.n_train if study else 50,
                                   lambda task, k: bar.update(tasks[task], advance=k), metric)
        except ValueError as e:
            raise click.UsageError(str(e))
    caption = (f"{n_samples} evaluation samples ({start}..{start + n_samples - 1} of the eval split); "
               f"L2 on the first {min(n_samples, L2_SAMPLES)}")
    console.print(rich_table(rows, f"{result.method}: {source.name}, {result.solver} NFE {result.nfe}", caption))
    console.print(verdict(rows))
    if json_path is not None:
        console.print(f"rows written to {write_json(rows, json_path)}")
    if run_id is not None:
        from ats.tracking import log_run_metrics
        metrics = run_metrics(rows, n_samples, start)
        log_run_metrics(run_id, tracking_uri, metrics)
        console.print(f"logged {len(metrics)} evaluate.* metrics to run {run_id}")


@main.command("sample")
@_fit_options
@click.option("--n", "n_samples", default=64, show_default=True, type=click.IntRange(1, SPLIT_SIZE),
              help="Number of samples.")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=Path("samples.png"),
              show_default=True, help="The PNG to write.")
@click.option("--seed", default=None, type=click.IntRange(0),
              help="First evaluation sample (sample i has its own seed); default 0.")
@click.option("--label", default=None, type=click.IntRange(0),
              help="Class of every sample (class-conditional digits); default: each seed's own.")
@click.option("--baseline", "baselines", multiple=True, type=click.Choice(BASELINES),
              help="Also draw the same seeds under this baseline, side by side (repeatable).")
def sample_command(result, source, study, run_id, tracking_uri, cache, n_samples, out, seed, label,
                   baselines) -> None:
    """Samples of a run's (or a file's) schedule or predictor: an image grid, or for gmm a scatter plot."""
    from ats.evaluate import check_baselines, draw, sample_labels, sample_seeds, save_samples

    try:
        check_baselines(source, result, baselines)
        seeds = sample_seeds(result, n_samples, seed)
        samples = draw(source, result, seeds, sample_labels(source, result, seeds, label), baselines,
                       study.n_train if study else 50, cache)
    except ValueError as e:
        raise click.UsageError(str(e))
    path = save_samples(source, samples, out)
    click.echo(f"{', '.join(samples)}: {n_samples} samples of {source.name} ({result.solver}, NFE {result.nfe}, "
               f"seeds {seeds[0]}..{seeds[-1]}) in {path}")


@main.command()
@_fit_options
@click.option("--format", "fmt", type=click.Choice(["diffusers", "torch"]), default="diffusers", show_default=True,
              help="diffusers: a global schedule's timesteps=/sigmas= lists, k-diffusion-style sigma lists "
                   "and a script that runs it; torch: a predictor as TorchScript.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="diffusers: the JSON file (default diffusers_schedule.json); torch: the folder (default "
                   "exported_predictor/).")
@click.option("--batch", default=16, show_default=True, type=click.IntRange(1),
              help="torch: the batch the files are traced for (the loader splits and pads any other).")
def export(result, source, study, run_id, tracking_uri, cache, fmt, out, batch) -> None:
    """Export a learned schedule for diffusers, or a predictor for torch without ats.

    A run's model comes from its study; with --schedule the dataset options name it (its
    noise schedule; for --format torch also the network traced into the files)."""
    import json

    from ats.atomic import write_atomic
    from ats.export import MODEL_DIR, ExportError, diffusers_schedule, diffusers_snippet, export_torch

    try:
        if fmt == "torch":
            files = export_torch(result, source, out or Path("exported_predictor"), batch)
            click.echo("\n".join(map(str, files)))
            click.echo(f"usage (torch only): import sys; sys.path.insert(0, '{files[0].parent}'); "
                       "from ats_predictor import sample, schedule")
            return
        data = diffusers_schedule(result, source.noise_schedule, source.info.get("model_type"))
    except ExportError as e:
        raise click.UsageError(str(e))
    snippet = diffusers_snippet(data, source.info.get("checkpoint", MODEL_DIR))
    out = out or Path("diffusers_schedule.json")
    if out.is_dir() or not out.parent.is_dir():
        raise click.BadParameter(f"{out} is a folder or lies in no folder; give a file path in an existing folder",
                                 param_hint="--out")
    out = write_atomic(out,
                       lambda tmp: tmp.write_text(json.dumps({**data, "snippet": snippet}, indent=2) + "\n"))
    if "timesteps_error_lambda" in data:
        click.echo(f"timesteps = {data['timesteps']}  (rounded to training steps: up to "
                   f"{data['timesteps_error_lambda']:.2g} in lambda)")
    elif "timesteps" in data:
        click.echo(f"timesteps = {[round(t, 4) for t in data['timesteps']]}  (the network's times, sigma * N)")
    click.echo(f"sigmas = {[round(s, 8) for s in data['sigmas']]}  (exact; the model's sigma, no trailing 0)")
    click.echo(f"sigmas_with_zero = {[round(s, 8) for s in data['sigmas_with_zero']]}  (the end replaced by 0)")
    click.echo(f"note: {data['sigmas_convention']}")
    click.echo(snippet)
    for note in data["notes"]:
        click.echo(f"note: {note}")
    click.echo(f"written to {out}")


if __name__ == "__main__":
    main()
