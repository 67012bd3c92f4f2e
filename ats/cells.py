"""A study cell (method or baseline, solver, NFE) and the names it goes by: in the Optuna space,
in ``state.json``, in MLflow and on disk. These spellings are stored, so they never change."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, NamedTuple


class Cell(NamedTuple):
    method: str   # a method or a baseline
    solver: str
    nfe: int

    @classmethod
    def of(cls, config: Mapping) -> Cell:
        """The cell of a trial config (or any mapping with method, solver and nfe)."""
        return cls(config["method"], config["solver"], int(config["nfe"]))

    @classmethod
    def from_state_key(cls, key: str) -> Cell:
        """The inverse of ``state_key``."""
        method, solver, nfe = key.rsplit("/", 2)
        return cls(method, solver, int(nfe))

    @property
    def key(self) -> str:
        """``method.solver.nfeN``: the Optuna parameter prefix, the key of a chosen trial in
        ``state.json`` and the suffix of the parent run's per-cell metrics."""
        return f"{self.method}.{self.solver}.nfe{self.nfe}"

    @property
    def state_key(self) -> str:
        """``name/solver/nfe``: a finished baseline in ``state.json``."""
        return f"{self.method}/{self.solver}/{self.nfe}"

    @property
    def baseline_key(self) -> str:
        """A baseline's MLflow child run key (tag ``ats.key``)."""
        return f"baseline/{self.state_key}"

    def baseline_folder(self, study_folder: Path) -> Path:
        """A baseline's result folder in the study folder."""
        return Path(study_folder) / "baselines" / f"{self.method}-{self.solver}-nfe{self.nfe}"

    @property
    def label(self) -> str:
        """``method solver nfeN``, for run names."""
        return f"{self.method} {self.solver} nfe{self.nfe}"

    @property
    def tags(self) -> dict[str, str]:
        """The MLflow tags that name the cell."""
        return {"method": self.method, "solver": self.solver, "nfe": str(self.nfe)}
