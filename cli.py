"""The ``ats`` command line: every verb is a thin call into the ``ats`` library."""
from __future__ import annotations

import click

from ats.discretize import KINDS
from ats.solvers import SOLVERS


def _int_list(ctx, param, value: str) -> list[int]:
    try:
        values = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}")
    if not values or min(values) < 1:
        raise click.BadParameter("give at least one integer >= 1")
    return values


def _choice_list(choices):
    def parse(ctx, param, value: str) -> list[str]:
        values = [v.strip() for v in value.split(",") if v.strip()]
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise click.BadParameter(f"{', '.join(bad) or 'nothing'} not among {', '.join(choices)}")
        return values
    return parse


@click.group()
@click.version_option(package_name="ats")
def main() -> None:
    """ats: adaptive timestep schedules for few-step diffusion sampling."""


@main.command()
@click.option("--dataset", default="gmm", show_default=True, help="Model source (embedded: gmm).")
@click.option("--solvers", default="ddim,dpm_solver++,uni_pc,ipndm,heun", show_default=True,
              callback=_choice_list(tuple(SOLVERS)), help="Comma-separated solvers.")
@click.option("--nfe", "nfes", default="3,5,7,10", show_default=True, callback=_int_list,
              help="Comma-separated numbers of network evaluations.")
@click.option("--discretizations", default=",".join(KINDS[:4]), show_default=True,
              callback=_choice_list(KINDS), help="Comma-separated fixed discretizations.")
@click.option("--n", "n_samples", default=512, show_default=True, type=click.IntRange(1),
              help="Number of samples (seeds seed..seed+n-1).")
@click.option("--seed", default=0, show_default=True, type=int, help="First latent seed.")
@click.option("--dim", default=16, show_default=True, type=click.IntRange(1), help="gmm: dimension.")
@click.option("--components", default=8, show_default=True, type=click.IntRange(1), help="gmm: components.")
def compare(dataset, solvers, nfes, discretizations, n_samples, seed, dim, components) -> None:
    """Error of every fixed discretization against a 1000-step reference, per solver and NFE."""
    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    from ats.baselines import error_table, reference_solution
    from ats.models.sources import load_source

    try:
        source = load_source(dataset, dim=dim, components=components)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--dataset")
    x = source.latents(range(seed, seed + n_samples))
    console = Console()
    with console.status("reference solution (UniPC-3, 1000 steps)"):
        ref = reference_solution(source, x)
    total = len(solvers) * len(nfes) * len(discretizations)
    rows = list(track(error_table(source, x, ref, solvers, nfes, discretizations), total=total,
                      description="sampling", console=console, transient=True))
    table = Table(title=f"{source.name}: mean L2 error to the reference, {n_samples} samples")
    table.add_column("solver")
    table.add_column("NFE", justify="right")
    for kind in discretizations:
        table.add_column(kind, justify="right")
    for solver in solvers:
        for n in nfes:
            errs = {r.discretization: r.l2 for r in rows if r.solver == solver and r.nfe == n}
            if errs:
                best = min(errs.values())
                table.add_row(solver, str(n), *(f"[bold]{errs[k]:.4f}[/bold]" if errs[k] == best
                                                else f"{errs[k]:.4f}" for k in discretizations))
    console.print(table)
    skipped = sorted({(r, n) for r in solvers for n in nfes} - {(r.solver, r.nfe) for r in rows})
    for solver, n in skipped:
        console.print(f"{solver}: NFE {n} skipped (Heun's N steps cost 2N - 1 calls, so its NFE is odd)")


if __name__ == "__main__":
    main()
