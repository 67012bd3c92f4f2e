from click.testing import CliRunner

from cli import main


def table_rows(output: str) -> dict[tuple[str, int], list[float]]:
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) > 2 and cells[1].isdigit():
            rows[(cells[0], int(cells[1]))] = [float(c) for c in cells[2:]]
    return rows


def test_compare_runs_end_to_end():
    result = CliRunner().invoke(main, ["compare", "--dataset", "gmm", "--n", "32", "--preset", "2d",
                                       "--solvers", "uni_pc,heun", "--nfe", "9,41", "--discretizations", "logSNR,edm"])
    assert result.exit_code == 0, result.output
    assert "mean L2 error" in result.output
    rows = table_rows(result.output)
    assert set(rows) == {("uni_pc", 9), ("uni_pc", 41), ("heun", 9), ("heun", 41)}
    assert all(len(v) == 2 and 0 < min(v) and max(v) < 10 for v in rows.values())
    # Far more steps, far smaller error, for every discretization and solver.
    for solver in ("uni_pc", "heun"):
        assert all(b < a / 4 for a, b in zip(rows[(solver, 9)], rows[(solver, 41)]))


def test_heun_skips_even_nfe():
    result = CliRunner().invoke(main, ["compare", "--n", "8", "--preset", "2d", "--solvers", "heun,ddim", "--nfe", "4",
                                       "--discretizations", "logSNR"])
    assert result.exit_code == 0, result.output
    assert set(table_rows(result.output)) == {("ddim", 4)}
    assert "heun: NFE 4 skipped" in result.output


def test_bad_flags_give_one_line_errors():
    runner = CliRunner()
    result = runner.invoke(main, ["compare", "--dataset", "imagenet"])
    assert result.exit_code == 2 and "'imagenet' is not one of" in result.output
    result = runner.invoke(main, ["compare", "--dataset", "cifar10"])
    assert result.exit_code == 2 and "needs --checkpoint DIR" in result.output
    result = runner.invoke(main, ["compare", "--solvers", "dpm"])
    assert result.exit_code == 2 and "dpm not among" in result.output
    result = runner.invoke(main, ["compare", "--nfe", "0"])
    assert result.exit_code == 2 and "integer >= 1" in result.output
