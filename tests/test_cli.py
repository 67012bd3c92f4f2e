from click.testing import CliRunner

from cli import main


def test_compare_runs_end_to_end():
    result = CliRunner().invoke(main, ["compare", "--dataset", "gmm", "--n", "32", "--dim", "4",
                                       "--solvers", "uni_pc,heun", "--nfe", "3,5", "--discretizations", "logSNR,edm"])
    assert result.exit_code == 0, result.output
    assert "mean L2 error" in result.output
    rows = [line for line in result.output.splitlines() if "uni_pc" in line or "heun" in line]
    assert len(rows) == 4
    values = [float(v) for line in rows for v in line.replace("│", " ").split()[2:]]
    assert len(values) == 8 and all(0 < v < 10 for v in values)


def test_bad_flags_give_one_line_errors():
    runner = CliRunner()
    result = runner.invoke(main, ["compare", "--dataset", "imagenet"])
    assert result.exit_code == 2 and "unknown dataset 'imagenet'" in result.output
    result = runner.invoke(main, ["compare", "--solvers", "dpm"])
    assert result.exit_code == 2 and "dpm not among" in result.output
    result = runner.invoke(main, ["compare", "--nfe", "0"])
    assert result.exit_code == 2 and "integer >= 1" in result.output
