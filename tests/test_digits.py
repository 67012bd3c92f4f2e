"""The shipped digits model and classifier: real weights, loaded as users load them."""
import pytest
import torch

from ats.discretize import get_timesteps
from ats.metrics import frechet_distance
from ats.models.digits import digits_metric
from ats.models import digits
from ats.models.digits import digits_source
from ats.solvers import sample


def test_shipped_unet_loads_and_samples_digits_like_images():
    source = digits_source()
    ckpt = torch.load(digits.DIGITS_UNET, weights_only=True)
    assert ckpt["meta"]["steps"] >= 1000
    assert digits.DIGITS_UNET.stat().st_size < 4_000_000
    x = source.latents(range(64), dtype=source.dtype)
    out = sample(source.model_fn, source.noise_schedule, x, get_timesteps(source.noise_schedule, "logSNR", 20),
                 "uni_pc")
    assert out.shape == (64, 1, 8, 8) and torch.isfinite(out).all()
    # Samples close to the data range, and far closer to real digits than noise is.
    assert out.abs().max() < 1.5
    metric = digits_metric()
    assert frechet_distance(metric, out) < 0.5 * frechet_distance(metric, x.clamp(-1, 1))


def test_shipped_classifier_accuracy_on_held_out_split():
    classifier = digits.load_digits_classifier()
    images, labels = digits.load_digits_data()
    _, held_out = digits.digits_split()
    with torch.no_grad():
        accuracy = (classifier(images[held_out]).argmax(1) == labels[held_out]).float().mean().item()
    assert accuracy >= 0.97
    assert torch.load(digits.DIGITS_CLASSIFIER, weights_only=True)["meta"]["held_out_accuracy"] == pytest.approx(accuracy)


def test_conditional_sampling_follows_labels():
    source = digits_source(conditional=True, guidance_scale=2.)
    assert source.labels(range(3)).shape == (3,) and digits_source().labels(range(3)) is None
    labels = torch.arange(10).repeat(3)
    x = source.latents(range(30), dtype=source.dtype)
    out = sample(source.model_fn_for(labels), source.noise_schedule, x,
                 get_timesteps(source.noise_schedule, "logSNR", 20), "dpm_solver++")
    with torch.no_grad():
        predicted = digits.load_digits_classifier()(out.clamp(-1, 1)).argmax(1)
    assert (predicted == labels).float().mean() >= 0.8


def test_training_runs_and_round_trips(tmp_path):
    seen = []
    model = digits.train_digits_unet(steps=3, batch_size=8, progress=lambda step, loss: seen.append(loss))
    assert len(seen) == 3 and all(l > 0 for l in seen)
    path = tmp_path / "unet.pt"
    digits.save_digits_unet(model, path, steps=3)
    loaded = digits.load_digits_unet(path)
    x, k = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    torch.testing.assert_close(loaded(x, k), model(x, k))
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_classifier_training_runs():
    model, accuracy = digits.train_digits_classifier(epochs=3)
    assert isinstance(model, digits.DigitsClassifier) and 0.8 < accuracy <= 1.  # chance is 0.1


def test_bad_weights_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ats train-model --dataset digits"):
        digits.load_digits_unet(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(digits.DIGITS_UNET.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot load digits model weights"):
        digits.load_digits_unet(corrupt)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": digits.DigitsClassifier().state_dict()}, other)
    with pytest.raises(ValueError, match="retrain them"):
        digits.load_digits_unet(other)
