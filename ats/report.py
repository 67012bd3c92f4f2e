"""Result tables of ``ats search``, ``ats evaluate`` and ``ats fit``: FID with its 95 % interval,
the paired change against the best baseline (and against LD3) with its own interval, a
verdict line, and the same rows as JSON. Rows of one table are scored on the same seeds,
which is what makes their changes paired (``ats.intervals``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .atomic import write_atomic
from .intervals import FID, NO_CHANGE, Change, FidEstimate

SIGNIFICANT = "*: the paired 95 % interval of the change excludes 0"


@dataclass
class Row:
    """A schedule scored on a table's seeds: a baseline or a method's fit."""
    name: str
    solver: str
    nfe: int
    fid: FidEstimate
    kind: str = "method"                 # "baseline" or "method"
    l2: float = math.nan                 # mean L2 distance to the teacher
    run_id: str | None = None
    fid_select: float = math.nan         # what chose it (ats search: FID on the selection seeds)
    vs_baseline: Change = field(default_factory=lambda: NO_CHANGE)
    vs_ld3: Change = field(default_factory=lambda: NO_CHANGE)
    reference: str | None = None         # the baseline vs_baseline is measured against
    others: dict[str, FidEstimate] = field(default_factory=dict)   # on other seed sets, by name: for pairing
    subset: bool = False                 # scored on fewer seeds than the table's other rows (set by compare)
    note: str = ""                       # what the name does not say (e.g. a predictor that fell back)

    @property
    def label(self) -> str:
        return self.name + (" (baseline)" if self.kind == "baseline" else "") + \
            (f" (first {self.fid.n} seeds)" if self.subset else "") + (f" ({self.note})" if self.note else "")

    def on(self, seeds: str) -> FidEstimate | None:
        """This schedule's estimate on the seed set ``seeds``, if it was scored there."""
        return self.fid if self.fid.seeds == seeds else self.others.get(seeds)

    def change_against(self, reference: "Row") -> Change:
        """The paired change against ``reference`` on this row's seeds (none where the reference
        was not scored on them)."""
        other = reference.on(self.fid.seeds)
        return NO_CHANGE if other is None else self.fid.change_pct(other)

    def to_json(self) -> dict[str, Any]:
        """One machine-readable row (percent changes are paired, 95 %)."""
        out = {"name": self.name, "kind": self.kind, "solver": self.solver, "nfe": self.nfe, "fid": self.fid.fid,
               "fid_low": self.fid.low, "fid_high": self.fid.high, "n": self.fid.n, "seeds": self.fid.seeds,
               "l2": self.l2, "run_id": self.run_id}
        if math.isfinite(self.fid_select):
            out["fid_select"] = self.fid_select
        if self.reference is not None and self.name != self.reference:
            out.update(reference=self.reference, vs_best_baseline_pct=self.vs_baseline.pct,
                       vs_best_baseline_low=self.vs_baseline.low, vs_best_baseline_high=self.vs_baseline.high)
        if math.isfinite(self.vs_ld3.pct):
            out.update(vs_ld3_pct=self.vs_ld3.pct, vs_ld3_low=self.vs_ld3.low, vs_ld3_high=self.vs_ld3.high)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def score_name(rows: Sequence[Row]) -> str:
    """What the rows' scores are: ``FID``, or where the model has no FID reference
    ``L2 to the teacher (no FID reference)`` (``ats.intervals.TEACHER_L2``)."""
    return next((r.fid.metric for r in rows), FID)


def console():
    """A rich console; 160 columns when the output is not a terminal (logs, CI), so tables do not wrap."""
    import os

    from rich.console import Console
    return Console(width=None if os.isatty(1) else 160)


def best_baseline(rows: Sequence[Row], by_select: bool = False) -> Row | None:
    """The baseline with the lowest FID (``by_select``: the lowest selection FID, so that the
    reference is not chosen on the seeds it is reported on)."""
    def key(r: Row) -> float:
        value = r.fid_select if by_select else r.fid.fid
        return value if math.isfinite(value) else math.inf
    base = [r for r in rows if r.kind == "baseline" and math.isfinite(r.fid.fid)]
    return min(base, key=key) if base else None


def compare(rows: Sequence[Row], by_select: bool = False) -> Row | None:
    """Fill every row's paired change against the best baseline and against LD3 (the method
    row named ``ld3``), on the row's own seeds (a row scored on the first seeds only pairs with
    the others' estimates there), and mark rows on fewer seeds than the rest; returns the
    reference baseline."""
    ref = best_baseline([r for r in rows if r.kind != "baseline" or not _fewer(r, rows)], by_select)
    ld3 = next((r for r in rows if r.kind == "method" and r.name == "ld3"), None)
    for r in rows:
        r.subset = _fewer(r, rows)
        if ref is not None:
            r.reference = ref.name
            r.vs_baseline = NO_CHANGE if r is ref else r.change_against(ref)
        if ld3 is not None and r.kind == "method" and r is not ld3:
            r.vs_ld3 = r.change_against(ld3)
    return ref


def _fewer(row: Row, rows: Sequence[Row]) -> bool:
    """Whether ``row`` was scored on fewer seeds than the most of ``rows``."""
    return row.fid.n < max(r.fid.n for r in rows)


def verdict(rows: Sequence[Row]) -> str:
    """One plain line: the best method, its change against the best baseline, and whether the
    change is significant."""
    methods = [r for r in rows if r.kind == "method" and math.isfinite(r.fid.fid) and not r.subset]
    ref = next((r.reference for r in rows if r.reference), None)
    if not methods:
        return f"no method finished; the best baseline is {ref}" if ref else "nothing finished"
    best = min(methods, key=lambda r: r.fid.fid)
    head = f"{best.solver} NFE {best.nfe}: best method {best.label}, {score_name(rows)} {best.fid.text()}"
    if ref is None:
        return head
    c = best.vs_baseline
    if not math.isfinite(c.pct):
        return f"{head}; no change against {ref} could be computed"
    if c.high < 0:
        word = "significantly better than"
    elif c.low > 0:
        word = "significantly worse than"
    else:
        word = "not significantly different from"
    return f"{head}, {c.pct:+.1f} % [{c.low:+.1f}, {c.high:+.1f}] against {ref}: {word} the best baseline"


def rich_table(rows: Sequence[Row], title: str, caption: str | None = None, run_ids: bool = False,
               select: bool = False):
    """FID ± half-width (or the score that stands in for it: ``score_name``), paired change
    against the reference (named in the header) and LD3, L2 to the teacher (a column of its own
    where the score is FID); methods in bold,
    significant changes marked. Solver and NFE columns only when the rows differ in them (else
    they belong in the title)."""
    from rich.table import Table
    ref = next((r.reference for r in rows if r.reference), "best baseline")
    score = score_name(rows)
    note = None if score == FID else f"ranked by the {score}: the mean distance to the teacher's samples from the " \
                                     "same noise, on all of these seeds"
    table = Table(title=title, caption="\n".join(c for c in (caption, note, SIGNIFICANT) if c))
    cells_vary = len({(r.solver, r.nfe) for r in rows}) > 1
    cols = ["schedule"] + (["solver", "NFE"] if cells_vary else []) + [f"{score} ± 95 %",
                                                                       f"vs {ref} (best baseline)"]
    if any(math.isfinite(r.vs_ld3.pct) for r in rows):
        cols.append("vs ld3")
    if select:
        cols.append("FID select" if score == FID else "L2 select")
    if score == FID:   # else the score is the L2 to the teacher already
        cols.append("L2 to teacher")
    if run_ids:
        cols.append("MLflow run")
    for col in cols:
        table.add_column(col, justify="left" if col in ("schedule", "solver", "MLflow run") else "right",
                         no_wrap=col in ("MLflow run", "FID ± 95 %"))
    for r in rows:
        cells = [r.label] + ([r.solver, str(r.nfe)] if cells_vary else []) + [r.fid.text(), r.vs_baseline.text()]
        if "vs ld3" in cols:
            cells.append(r.vs_ld3.text())
        if select:
            cells.append(_num(r.fid_select))
        if "L2 to teacher" in cols:
            cells.append(_num(r.l2))
        if run_ids:
            cells.append(r.run_id or "")
        table.add_row(*(cells if r.kind == "baseline" else (f"[bold]{c}[/bold]" for c in cells)))
    return table


def markdown(rows: Sequence[Row]) -> str:
    """The table as Markdown (``summary.md``)."""
    ref = next((r.reference for r in rows if r.reference), "best baseline")
    lines = [f"| schedule | solver | NFE | {score_name(rows)} ± 95 % | n | vs {ref} (best baseline) | vs ld3 | "
             "L2 to teacher | MLflow run |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.label} | {r.solver} | {r.nfe} | {r.fid.text()} | {r.fid.n} | {r.vs_baseline.text()} | "
                     f"{r.vs_ld3.text()} | {_num(r.l2)} | {r.run_id or ''} |")
    return "\n".join(lines + ["", SIGNIFICANT, ""])


def write_json(rows: Sequence[Row], path: str | Path) -> Path:
    """One object per row (``Row.to_json``), written atomically."""
    text = json.dumps([r.to_json() for r in rows], indent=2) + "\n"
    return write_atomic(Path(path), lambda tmp: Path(tmp).write_text(text))


def _num(v: float) -> str:
    return f"{v:.4f}" if math.isfinite(v) else ""
