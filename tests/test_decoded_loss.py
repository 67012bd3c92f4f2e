"""``loss_space: image`` (``--loss-space image``) on the tiny latent pipelines of test_pipelines:
the fits' losses compare VAE-decoded images, the gradient reaches the schedule through the
decoder, the teacher targets stay cached latents, and a model without a VAE refuses it."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import test_pipelines  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from test_pipelines import fit_args  # noqa: E402

from ats.cli import main  # noqa: E402
from ats.losses import teacher_loss  # noqa: E402
from ats.methods import FitContext, FitResult  # noqa: E402
from ats.methods.ld3 import Student  # noqa: E402
from ats.methods.oracle import fit_oracle  # noqa: E402
from ats.methods.predictors import fit_predictor  # noqa: E402
from ats.models.sources import get_dataset, load_source  # noqa: E402
from ats.params import timesteps_from_logits  # noqa: E402
from ats.solvers import NetworkCalls, sample  # noqa: E402
from ats.teacher import TeacherData, split_seeds  # noqa: E402

models = test_pipelines.models   # the tiny pipeline folders (a module fixture)

@pytest.fixture(scope="module")
def spaces(models):
    """The unconditional latent folder with its losses on latents and on decoded images."""
    return {space: load_source("diffusers", checkpoint=str(models["uncond"]), loss_space=space)
            for space in ("latent", "image")}


def by_hand(source, z: torch.Tensor) -> torch.Tensor:
    """The VAE's images of latents ``z``, as diffusers' pipelines decode them (no shift factor here)."""
    vae = source.networks[1]
    with torch.no_grad():
        return vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)


def toy_data(source, n: int = 3) -> TeacherData:
    """Latents of training seeds against stand-in targets (the latents of validation seeds)."""
    seeds = split_seeds("train", n)
    return TeacherData(torch.tensor(list(seeds)), source.latents(seeds, torch.float32),
                       source.latents(split_seeds("valid", n), torch.float32), None)


def test_the_image_loss_is_the_distance_of_the_decoded_images(spaces):
    latent, image = spaces["latent"], spaces["image"]
    assert image.loss_space == "image" and latent.loss_space == "latent" and image.info["loss_space"] == "image"
    assert image.identity == latent.identity   # one teacher cache: the targets are the same latents
    data = toy_data(image)
    loss = teacher_loss("l2", image)
    decoded = loss.targets(data)
    assert decoded.latents is data.latents and decoded.targets.shape == (3, 3, 16, 16)
    x = data.latents
    torch.testing.assert_close(loss(x, decoded.targets),
                               (by_hand(image, x) - by_hand(image, data.targets)).flatten(1).norm(dim=1))
    huber = teacher_loss("pseudo_huber", image)
    c = 0.00054 * (3 * 16 * 16) ** 0.5
    d = (by_hand(image, x) - by_hand(image, data.targets)).flatten(1)
    torch.testing.assert_close(huber(x, decoded.targets), (d.square().sum(1) + c * c).sqrt() - c)
    # The default compares the latents themselves, as before.
    plain = teacher_loss("l2", latent)
    assert plain.targets(data) is data
    torch.testing.assert_close(plain(x, data.targets), (x - data.targets).flatten(1).norm(dim=1))
    with pytest.raises(ValueError, match="pass the teacher data through TeacherLoss.targets"):
        loss(x, data.targets)   # latent targets against decoded samples


def schedule_gradient(source, calls: NetworkCalls = NetworkCalls()) -> tuple[torch.Tensor, torch.Tensor]:
    """d loss / d (theta, xi) of a 3-step DPM-Solver++ student on the toy data."""
    student = Student(source, "dpm_solver++", None, calls=calls)
    theta = torch.zeros(4, requires_grad=True)
    xi = torch.zeros(4, requires_grad=True)
    loss = teacher_loss("l2", source, calls)
    data = loss.targets(toy_data(source))
    loss(student(theta, xi, data.latents / student.sigma_T, None), data.targets).mean().backward()
    return theta.grad, xi.grad


def test_gradients_reach_the_schedule_through_the_decoder(spaces):
    image = spaces["image"]
    decoder_calls: list[bool] = []
    hook = image.networks[1].decoder.register_forward_pre_hook(   # a pre-hook: recomputation stops early
        lambda module, args: decoder_calls.append(torch.is_grad_enabled()))
    try:
        theta, xi = schedule_gradient(image)
        assert decoder_calls == [False, True]   # the targets once without gradient, the student's samples with
        decoder_calls.clear()
        theta_ckpt, xi_ckpt = schedule_gradient(image, NetworkCalls(checkpoint=True))
        assert len(decoder_calls) == 3   # checkpointed: the samples' decode runs again in the backward pass
    finally:
        hook.remove()
    assert torch.isfinite(theta).all() and theta.abs().max() > 0 and xi[1:-1].abs().max() > 0
    torch.testing.assert_close(theta_ckpt, theta, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(xi_ckpt, xi, rtol=1e-4, atol=1e-7)
    theta_latent, _ = schedule_gradient(spaces["latent"])
    cosine = torch.nn.functional.cosine_similarity(theta, theta_latent, dim=0)
    assert cosine < 0.999   # another loss, another direction


def test_the_oracle_and_the_predictors_compare_decoded_images(spaces):
    image = spaces["image"]
    data = toy_data(image)
    zeros = torch.zeros(4)
    ts = timesteps_from_logits(zeros, image.noise_schedule)
    with torch.no_grad():
        out = sample(image.model_fn, image.noise_schedule, data.latents, ts, "ddim")
    expected = (by_hand(image, out) - by_hand(image, data.targets)).flatten(1).norm(dim=1)
    oracle = fit_oracle(image, data, "ddim", 3, init=zeros, iterations=1, restarts=0)
    torch.testing.assert_close(torch.tensor(oracle.info["start_loss"]), expected, rtol=1e-4, atol=1e-6)
    assert max(oracle.info["loss"]) <= max(oracle.info["start_loss"]) + 1e-6
    predictor = fit_predictor("oneshot", image, data, data, "ddim", 3, base=zeros, epochs=0)
    assert predictor.history["valid_loss"][0] == pytest.approx(expected.mean().item(), rel=1e-4)


def test_shared_fits_are_kept_apart_by_loss_space(spaces, tmp_path):
    fits: list[str] = []

    def fit(space: str):
        def run() -> FitResult:
            fits.append(space)
            return FitResult("ld3", "ddim", None, 3, timesteps=torch.tensor([1., .5, .2, .001]))
        return run

    for space in ("latent", "image", "image", "latent"):
        FitContext(spaces[space], "ddim", 3, cache=tmp_path).shared("ld3_start", {}, fit(space))
    assert fits == ["latent", "image"]   # each space fitted once, never the other's result


def test_ld3_through_the_cli_on_decoded_images_differs_from_the_latent_fit(models, tmp_path):
    cache = models["root"] / "cache"
    schedules = {}
    for space in ("latent", "image"):
        args = fit_args(models, tmp_path / space, "ld3", "epochs=2", "batch_size=4")
        result = CliRunner().invoke(main, args + ["--loss-space", space])
        assert result.exit_code == 0, result.output
        assert "best method ld3" in " ".join(result.output.split())
        schedules[space] = json.loads((tmp_path / space / "ld3" / "schedule.json").read_text())
        if space == "latent":
            teachers = sorted(p.name for p in cache.iterdir())
    assert sorted(p.name for p in cache.iterdir()) == teachers   # the image fit reused the cached latent targets
    latent, image = schedules["latent"], schedules["image"]
    assert image["info"]["loss_space"] == "image" and "loss_space" not in latent["info"]
    assert image["info"]["source"] == latent["info"]["source"] == "pipeline:sd-tiny-cfg2"
    assert image["info"]["best_valid_loss"] != pytest.approx(latent["info"]["best_valid_loss"], rel=1e-3)
    assert not torch.allclose(torch.tensor(image["timesteps"]), torch.tensor(latent["timesteps"]), rtol=0, atol=1e-6)


def test_image_loss_space_without_a_vae_is_a_one_line_error(models, tmp_path):
    from test_cifar10 import make_checkpoint
    make_checkpoint(tmp_path / "ddpm")   # a pixel-space UNet2DModel folder: no VAE
    ddpm = str(tmp_path / "ddpm")
    with pytest.raises(ValueError, match=r"--loss-space image decodes latents with the model's VAE; the UNet2DModel "
                                         r"folder .*ddpm has none .*: leave --loss-space out") as e:
        load_source("diffusers", checkpoint=ddpm, loss_space="image")
    assert "\n" not in str(e.value)
    assert load_source("diffusers", checkpoint=ddpm, loss_space="latent").loss_space == "latent"
    assert any("--loss-space image decodes latents" in p
               for p in get_dataset("diffusers").problems(checkpoint=ddpm, loss_space="image"))
    result = CliRunner().invoke(main, ["teacher", "--dataset", "diffusers", "--checkpoint", ddpm, "--loss-space",
                                       "image", "--n", "2"])
    assert result.exit_code == 2 and "leave --loss-space out" in result.output
    result = CliRunner().invoke(main, ["teacher", "--dataset", "gmm", "--loss-space", "image", "--n", "2"])
    assert result.exit_code == 2 and "--loss-space is an option of dataset diffusers, not gmm" in result.output
    with pytest.raises(ValueError, match="model.loss_space"):
        load_source("diffusers", checkpoint=str(models["uncond"]), loss_space="pixels")
    with pytest.raises(ValueError, match="has none"):
        replace(load_source("gmm", preset="2d"), loss_space="image")
