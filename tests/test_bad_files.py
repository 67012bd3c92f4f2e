"""Corrupt, foreign or inconsistent files get one clear line, from the library and the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ats.cli import main
from ats.discretize import get_timesteps
from ats.evaluate import load_schedule_file
from ats.methods.common import FitResult
from ats.methods.results import load_result, save_result, save_schedule_json
from ats.models.gmm import gmm_source

GMM = ["--dataset", "gmm", "--preset", "2d"]


def schedule(steps: int = 4, solver: str = "uni_pc") -> FitResult:
    ts = get_timesteps(gmm_source(dim=2).noise_schedule, "edm", steps)
    return FitResult("ld3", solver, None, steps, timesteps=ts, info={"epochs": 1})


def json_file(path: Path, **changes) -> Path:
    """A real schedule.json of ``schedule()``, with ``changes`` (None deletes a key)."""
    data = schedule().to_json()
    for key, value in changes.items():
        data.pop(key) if value is None else data.__setitem__(key, value)
    path.write_text(json.dumps(data))
    return path


def torch_file(path: Path, edit=None) -> Path:
    """A real result.pt of ``schedule()``; ``edit(state)`` changes what is saved."""
    save_result(schedule(), path)
    if edit is not None:
        state = torch.load(path, weights_only=True)
        torch.save(edit(state), path)
    return path


def drop(key):
    return lambda state: {k: v for k, v in state.items() if k != key}


def cases(tmp: Path) -> list[tuple[Path, str]]:
    """(file, the start of its error after the path)."""
    ts6 = get_timesteps(gmm_source(dim=2).noise_schedule, "edm", 5).tolist()
    (tmp / "text.pt").write_text("not a torch file")
    (tmp / "broken.json").write_text('{"method": "ld3", "solver": ')
    torch.save([1, 2, 3], tmp / "list.pt")
    (tmp / "truncated.pt").write_bytes(torch_file(tmp / "whole.pt").read_bytes()[:200])
    return [
        (tmp / "text.pt", ": not a torch file written by ats (UnpicklingError"),
        (tmp / "truncated.pt", ": not a torch file written by ats ("),
        (tmp / "list.pt", ": holds a list, not a fit result"),
        (torch_file(tmp / "no-method.pt", drop("method")), ": lacks method, so it is no fit result"),
        (torch_file(tmp / "no-steps.pt", drop("steps")), ": lacks steps, so it is no fit result"),
        (torch_file(tmp / "short.pt", lambda s: {**s, "timesteps": s["timesteps"][:-1]}),
         ": timesteps has shape (4,), but 4 steps take 5 times"),
        (tmp / "broken.json", ": not a readable JSON file (Expecting value: line 1 column 29"),
        (json_file(tmp / "no-method.json", method=None), ": lacks method, so it is no fit result"),
        (json_file(tmp / "no-solver.json", solver=None), ": lacks solver, so it is no fit result"),
        (json_file(tmp / "more-times.json", timesteps=ts6), ": timesteps has shape (6,), but 4 steps take 5 times"),
        (json_file(tmp / "wrong-nfe.json", steps=5, timesteps=ts6), ": nfe 4 does not match its 5 steps of uni_pc"),
        (json_file(tmp / "words.json", timesteps=["a", "b"]), ": timesteps must be a list of numbers"),
        (json_file(tmp / "bad-solver.json", solver="nope"), ": not a valid fit result (ValueError: "),
    ]


def test_library_loaders_name_the_file_and_the_problem(tmp_path):
    for path, expected in cases(tmp_path):
        loader = load_schedule_file if path.suffix == ".json" else load_result
        with pytest.raises(ValueError) as e:
            loader(path)
        message = str(e.value)
        assert message.startswith(f"{path}{expected}") and "\n" not in message, message
        if "written by" not in expected and "JSON" not in expected:
            assert message.endswith(("result.pt or schedule.json written by `ats fit` or `ats search`",
                                     "fix steps or the times", "fix nfe or the times (steps + 1 of them)"))
    assert load_schedule_file(json_file(tmp_path / "good.json")).nfe == 4
    assert load_result(torch_file(tmp_path / "good.pt")).steps == 4


@pytest.mark.parametrize("command", [["evaluate", "--n", "8"], ["export"], ["sample", "--n", "4"]])
def test_cli_refuses_bad_schedule_files_with_one_line(tmp_path, command):
    for path, expected in cases(tmp_path):
        out = CliRunner().invoke(main, [*command, "--schedule", str(path), *GMM, "--cache", str(tmp_path / "c")])
        error = out.output.split("Error: ", 1)[-1]
        assert out.exit_code == 2 and error.count("\n") == 1, out.output
        assert " ".join(error.split()).startswith(f"Invalid value for --schedule: {path}{expected}"), out.output
    assert not (tmp_path / "c").exists()   # refused before any work


def test_nfe_mismatch_is_not_scored_at_the_wrong_nfe(tmp_path):
    """Times of 5 steps under a file saying 4 steps: refused, not evaluated as NFE 4."""
    ts6 = get_timesteps(gmm_source(dim=2).noise_schedule, "edm", 5).tolist()
    path = json_file(tmp_path / "s.json", timesteps=ts6)
    out = CliRunner().invoke(main, ["evaluate", "--schedule", str(path), *GMM, "--n", "8"])
    assert out.exit_code == 2 and "timesteps has shape (6,), but 4 steps take 5 times" in out.output


def test_baseline_beyond_its_limits_is_refused_before_any_work(tmp_path):
    path = tmp_path / "s.json"
    save_schedule_json(schedule(steps=100), path)
    out = CliRunner().invoke(main, ["evaluate", "--schedule", str(path), *GMM, "--baselines", "edm,gits",
                                    "--cache", str(tmp_path / "c")])
    assert out.exit_code == 2 and "Invalid value for --baselines: baseline gits: gits picks its steps from a fine " \
        "grid of 60 intervals, so it takes at most 60 steps, not 100" in " ".join(out.output.split())
    out = CliRunner().invoke(main, ["sample", "--schedule", str(path), *GMM, "--baseline", "gits",
                                    "--out", str(tmp_path / "x.png")])
    assert out.exit_code == 2 and "baseline gits: gits picks its steps" in out.output
    assert not (tmp_path / "c").exists()
    out = CliRunner().invoke(main, ["fit", "--method", "gits", *GMM, "--nfe", "1000", "--out", str(tmp_path / "r")])
    assert out.exit_code == 2 and "takes at most 60 steps, not 1000; lower the NFE" in out.output


def test_non_finite_guidance_scale_is_refused(tmp_path):
    path = json_file(tmp_path / "s.json")
    for value in ("nan", "inf", "-inf"):
        out = CliRunner().invoke(main, ["sample", "--schedule", str(path), "--dataset", "digits",
                                        "--guidance-scale", value])
        assert out.exit_code == 2 and f"model.guidance_scale: must be a number, got {value.lstrip('-')}" \
            in out.output.replace("-inf", "inf"), out.output


def checkpoint(folder: Path, config: str) -> Path:
    """A diffusers checkpoint folder whose config.json holds ``config``."""
    folder.mkdir()
    (folder / "config.json").write_text(config)
    (folder / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
        "prediction_type": "epsilon"}))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    return folder


def test_broken_checkpoint_config_names_the_file(tmp_path):
    from ats.models.diffusers_unet import cifar10_source
    broken = checkpoint(tmp_path / "broken", '{"_class_name": "UNet2DModel", "in_channels": 3,')
    with pytest.raises(ValueError) as e:
        cifar10_source(broken)
    message = str(e.value)
    assert message.startswith(f"checkpoint file {broken / 'config.json'} is not valid JSON (Expecting")
    assert "corrupt or truncated" in message and "\n" not in message
    listed = checkpoint(tmp_path / "listed", "[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json holds a list, not a config mapping"):
        cifar10_source(listed)
    out = CliRunner().invoke(main, ["sample", "--schedule", str(json_file(tmp_path / "s.json")),
                                    "--dataset", "cifar10", "--checkpoint", str(broken)])
    assert out.exit_code == 2 and f"checkpoint file {broken / 'config.json'} is not valid JSON" \
        in " ".join(out.output.split())


def one_line_error(args: list[str], *needles: str) -> None:
    """The command exits 2 with one ``Error:`` line holding every needle, and no traceback."""
    result = CliRunner().invoke(main, args)
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and all(n in text for n in needles), result.output


def test_sweep_of_bad_paths_and_values_gives_one_line(tmp_path):
    """Inputs a sweep of the CLI found ending in a traceback, a hang or a silent result."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    fit = ["fit", "--method", "ld3", *GMM, "--solver", "uni_pc", "--nfe", "4", "--n-train", "8", "--n-valid", "8",
           "--option", "epochs=1", "--cache", str(tmp_path / "cache")]
    one_line_error([*fit[:-2], "--cache", str(afile), "--out", str(tmp_path / "o1")], "teacher cache", "--cache")
    one_line_error([*fit, "--out", str(tmp_path / "o2"), "--option", "epochs=2"], "epochs is given twice")
    one_line_error([*fit[:10], "100000", *fit[11:], "--out", str(tmp_path / "o3")], "--nfe", "1<=x<=1000")
    one_line_error(["compare", "--dataset", "gmm", "--dim", "100000000"], "model.dim: must be <= 1024")
    one_line_error([*fit, "--seed", "-1", "--out", str(tmp_path / "o4")], "--seed")
    one_line_error([*fit[:-2], "--n-valid", "1", "--out", str(tmp_path / "o5")], "--n-valid")
    one_line_error(["compare", *GMM, "--solvers", ","], "give at least one of ddim")
    one_line_error(["teacher", *GMM, "--solver", "heun", "--nfe", "4", "--n", "8", "--cache", str(tmp_path / "c")],
                   "cannot spend exactly 4 network calls; it can spend 3 or 5")
    if Path("/proc").is_dir():   # a folder nobody can create in, even root
        one_line_error([*fit, "--out", "/proc/ats-out"], "cannot create /proc/ats-out")
    good = json_file(tmp_path / "good.json")
    one_line_error(["export", "--schedule", str(good), "--out", str(tmp_path)], "is a folder")
    one_line_error(["evaluate", "--schedule", str(good), *GMM, "--baselines", ""], "give at least one of")
    rising = json_file(tmp_path / "rising.json", timesteps=schedule().timesteps.flip(0).tolist())
    one_line_error(["sample", "--schedule", str(rising), *GMM, "--out", str(tmp_path / "s.png")],
                   "not strictly decreasing")


def test_a_fit_is_not_used_with_another_model(tmp_path):
    """A result records the model it was fitted on; export/evaluate/sample refuse another."""
    from ats.methods import fit_method
    result = fit_method("dmn", gmm_source(dim=2), "uni_pc", 4)
    assert result.info["source"] == "gmm-2d-8k-s0"
    save_result(result, tmp_path / "result.pt")
    one_line_error(["export", "--schedule", str(tmp_path / "result.pt"), "--out", str(tmp_path / "x.json")],
                   "the fit was made for gmm-2d-8k-s0, whose noise schedule", "is not digits's")


def test_study_and_resume_mistakes_give_one_line(tmp_path):
    from ats.study import StudyError, load_study
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 2)
    with pytest.raises(StudyError, match="binary.yaml: not a text file"):
        load_study(binary)
    (tmp_path / "empty").mkdir()
    one_line_error(["search", "--resume", str(tmp_path / "empty")], "is not a study folder of `ats search`")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "study.yaml").write_text("dataset: gmm\n")
    (broken / "state.json").write_text("{broken")
    one_line_error(["search", "--resume", str(broken)], "state.json is not a study state")


@pytest.mark.parametrize("uri", ["nope://x", "http://localhost:5000"])
def test_server_names_its_own_flag_for_a_store_that_is_no_database(uri):
    result = CliRunner().invoke(main, ["server", "--backend-store-uri", uri, "--port", "5998"])
    assert result.exit_code == 1 and "--backend-store-uri must be a database" in result.output, result.output
