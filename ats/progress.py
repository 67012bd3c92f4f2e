"""The live table of ``ats search``: a line per trial (method, solver, NFE, status, phase,
step, loss, FID), redrawn in a terminal; elsewhere (logs, CI) a line per finished trial."""
from __future__ import annotations

import math
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table


class TrialTable:
    def __init__(self, live: bool = True, console: Console | None = None, every: float = 0.5,
                 score: str = "FID") -> None:
        self.console = console or Console()
        self.score = score   # what ranks the trials, in short: FID, or L2 (to the teacher) without an FID reference
        self.rows: dict[str, dict] = {}
        self.every, self.last = every, 0.0
        self.live = Live(self.render(), console=self.console, refresh_per_second=4, transient=False) \
            if live and self.console.is_terminal else None
        if self.live is not None:
            self.live.start()

    def update(self, trial, status: str, result: dict | None = None) -> None:
        c = trial.config
        row = self.rows.setdefault(trial.trial_id, {"method": c["method"], "solver": c["solver"], "nfe": c["nfe"]})
        row["status"] = status
        if result:
            row.update({k: result[k] for k in ("fid_select", "fid_select_low", "fid_select_high", "fit_seconds", "error") if k in result})
        if self.live is None and status in ("DONE", "FAILED", "RETRYING"):
            self.console.print(self.line(trial.trial_id, row))
        self.redraw()

    def progress(self, snapshot: dict[str, dict]) -> None:
        """Per-trial progress sent by the workers: phase, step, loss."""
        for trial_id, info in snapshot.items():
            if trial_id in self.rows and self.rows[trial_id].get("status") == "RUNNING":
                self.rows[trial_id].update(info)
        self.redraw()

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.every:
            return False
        self.last = now
        return True

    def redraw(self) -> None:
        if self.live is not None:
            self.live.update(self.render())

    def render(self) -> Table:
        table = Table(title="trials", expand=False)
        select = f"{self.score} select"
        for col in ("trial", "method", "solver", "NFE", "status", "phase", "step", "loss", select):
            table.add_column(col, justify="right" if col in ("NFE", "step", "loss", select) else "left")
        for trial_id, r in self.rows.items():
            table.add_row(trial_id, r["method"], r["solver"], str(r["nfe"]), r.get("status", ""), r.get("phase", ""),
                          str(r.get("step", "")), _num(r.get("loss")), _fid(r))
        return table

    def line(self, trial_id: str, r: dict) -> str:
        if r["status"] == "RETRYING":
            return f"trial {trial_id} {r['method']} {r['solver']} NFE {r['nfe']}: crashed, retrying"
        if r["status"] == "FAILED":
            return f"trial {trial_id} {r['method']} {r['solver']} NFE {r['nfe']}: FAILED ({r.get('error', '')})"
        return (f"trial {trial_id} {r['method']} {r['solver']} NFE {r['nfe']}: {self.score} select {_fid(r)} "
                f"({r.get('fit_seconds', math.nan):.0f} s fit)")

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()


def _num(v) -> str:
    return "" if v is None else f"{v:.4g}"


def _fid(r: dict) -> str:
    """The selection FID with its 95 % half-width."""
    v, low, high = (r.get(k) for k in ("fid_select", "fid_select_low", "fid_select_high"))
    if v is None:
        return ""
    return f"{v:.4g} ± {(high - low) / 2:.2g}" if low is not None and high is not None else f"{v:.4g}"
