"""The diffusers-checkpoint path on a tiny UNet2DModel saved in the ddpm-cifar10-32 layout."""
import json
import os

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ats.discretize import get_timesteps  # noqa: E402
from ats.metrics import (QuantizedFeatures, find_inception_weights, frechet_distance, frechet_metric,  # noqa: E402
                         load_reference, set_real_statistics, to_uint8)
from ats.models.diffusers_unet import cifar10_source, load_unet_checkpoint  # noqa: E402
from ats.solvers import sample  # noqa: E402
from ats.teacher import TeacherConfig, generate_teacher, split_seeds  # noqa: E402


def make_checkpoint(path, prediction_type="epsilon", beta_end=0.02):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(path)
    diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=beta_end,
                            prediction_type=prediction_type).save_pretrained(path)
    return unet


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "ddpm-tiny"
    make_checkpoint(path)
    return path


def test_layout_load_wrap_sample_teacher(checkpoint, tmp_path):
    assert {p.name for p in checkpoint.iterdir()} >= {"config.json", "scheduler_config.json",
                                                      "diffusion_pytorch_model.safetensors"}
    source = cifar10_source(checkpoint)
    assert source.shape == (3, 8, 8) and source.info["model_type"] == "noise"
    # The noise schedule comes from the scheduler's betas.
    ac = diffusers.DDPMScheduler.from_pretrained(checkpoint).alphas_cumprod.double()
    torch.testing.assert_close(source.noise_schedule.marginal_alpha(torch.tensor(0.5, dtype=torch.float64)) ** 2,
                               ac[499], rtol=1e-6, atol=0)
    x = source.latents(range(4))
    out = sample(source.model_fn, source.noise_schedule, x, get_timesteps(source.noise_schedule, "logSNR", 4), "uni_pc")
    assert out.shape == (4, 3, 8, 8) and torch.isfinite(out).all()
    data = generate_teacher(source, split_seeds("train", 6), TeacherConfig(nfe=5), tmp_path / "cache")
    assert data.targets.shape == (6, 3, 8, 8) and torch.isfinite(data.targets).all()


def test_v_prediction_checkpoint_uses_v_model_type(tmp_path):
    make_checkpoint(tmp_path / "v", prediction_type="v_prediction")
    assert load_unet_checkpoint(tmp_path / "v")[2] == "v"


def test_missing_and_wrong_checkpoints(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="needs --checkpoint DIR.*google/ddpm-cifar10-32"):
        cifar10_source(None)
    with pytest.raises(ValueError, match="is not a directory"):
        cifar10_source(tmp_path / "nope")
    (checkpoint / "scheduler_config.json").unlink()
    with pytest.raises(ValueError, match="lacks scheduler_config.json"):
        cifar10_source(checkpoint)
    broken = tmp_path / "broken"
    make_checkpoint(broken)
    weights = broken / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(ValueError, match="corrupt or of another architecture"):
        cifar10_source(broken)
    other = tmp_path / "other"
    make_checkpoint(other)
    config = json.loads((other / "config.json").read_text())
    config["_class_name"] = "UNet2DConditionModel"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a UNet2DModel"):
        cifar10_source(other)


def test_inception_weights_missing_is_named_before_sampling(checkpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("ATS_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth"):
        find_inception_weights()
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    source = cifar10_source(checkpoint, fid_reference=ref)
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        source.make_metric()


def test_inception_fid_with_random_weights(checkpoint, tmp_path, monkeypatch):
    """The standard InceptionV3 path, with a randomly initialised network saved to a file."""
    if not os.environ.get("ATS_REQUIRE_IMAGES"):  # CI's images stage sets it: there a skip is a failure
        pytest.importorskip("torch_fidelity", reason="the InceptionV3 FID needs ats[images] (torch-fidelity)")
    from torch_fidelity import feature_extractor_inceptionv3 as fe
    with monkeypatch.context() as m:
        # Only to make the random weights file: torch-fidelity would download the real ones.
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), weights)
    real = tmp_path / "real"
    real.mkdir()
    from PIL import Image
    for i in range(8):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(real / f"{i}.png")
    source = cifar10_source(checkpoint, inception_weights=weights, fid_reference=real)
    metric = source.make_metric()
    x = sample(source.model_fn, source.noise_schedule, source.latents(range(8)),
               get_timesteps(source.noise_schedule, "logSNR", 3), "ddim")
    assert np.isfinite(frechet_distance(metric, x))


def test_reference_statistics_from_npz_and_image_folder(tmp_path):
    """Reference loading through a small real extractor (mean colour and contrast features)."""
    feats = QuantizedFeatures(lambda x: torch.stack([x.mean((2, 3)), x.std((2, 3))], 1).flatten(1), 6)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.uniform(-1, 1, (64, 3, 8, 8))).float()
    from PIL import Image
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(to_uint8(images)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    from_folder = frechet_metric(feats)
    load_reference(from_folder, folder)
    f = feats(to_uint8(images)).double()
    np.savez(tmp_path / "ref.npz", mu=f.mean(0).numpy(), sigma=np.cov(f.numpy(), rowvar=False))
    from_npz = frechet_metric(feats)
    load_reference(from_npz, tmp_path / "ref.npz")
    assert frechet_distance(from_folder, images) < 1e-6
    assert frechet_distance(from_npz, images) < 1e-3
    assert frechet_distance(from_npz, images * 0.5) > 0.01
    with pytest.raises(ValueError, match="use statistics of the same network"):
        set_real_statistics(frechet_metric(feats), np.zeros(5), np.eye(5))
    with pytest.raises(FileNotFoundError, match="neither a .npz"):
        load_reference(frechet_metric(feats), tmp_path / "missing")
