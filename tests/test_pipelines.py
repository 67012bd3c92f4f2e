"""Dataset ``diffusers``: tiny latent pipelines built here and saved in diffusers' on-disk layout
(a text-to-image StableDiffusionPipeline folder, a class-conditional and an unconditional
latent folder with a hand-written model_index.json), driven by ats as a user would."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from ats.cli import main  # noqa: E402
from ats.intervals import TEACHER_L2  # noqa: E402
from ats.metrics import TeacherDistance  # noqa: E402
from ats.models.sources import get_dataset, load_source  # noqa: E402
from ats.solvers import sample  # noqa: E402
from ats.teacher import TeacherConfig, generate_teacher, split_seeds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "a dog on a mat", "blue sky", "two birds"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tokenizer_files(folder: Path) -> Path:
    """A CLIP BPE vocabulary of single letters (with and without the end-of-word mark)."""
    folder.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in LETTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def tiny_unet(**kwargs) -> "diffusers.UNet2DConditionModel":
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4, **kwargs)


def tiny_vae() -> "diffusers.AutoencoderKL":
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                   layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16)


def text_pipeline(path: Path, tmp: Path) -> Path:
    """StableDiffusionPipeline(tiny parts).save_pretrained(path): model_index.json, unet/, vae/,
    text_encoder/, tokenizer/, scheduler/ (DDPM, scaled_linear betas as Stable Diffusion's)."""
    torch.manual_seed(0)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_files(tmp / "vocab"), model_max_length=12)
    encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=2 + 2 * len(LETTERS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=12, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, steps_offset=1)
    diffusers.StableDiffusionPipeline(vae=tiny_vae(), text_encoder=encoder, tokenizer=tokenizer, unet=tiny_unet(),
                                      scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False).save_pretrained(path)
    return path


def latent_folder(path: Path, classes: int | None) -> Path:
    """A latent model without a text encoder, in the pipeline layout written by hand: each part
    ``save_pretrained`` into its subfolder, and a model_index.json naming them. A DDIM
    scheduler with v-prediction."""
    torch.manual_seed(1)
    tiny_unet(num_class_embeds=classes).save_pretrained(path / "unet")
    tiny_vae().save_pretrained(path / "vae")
    diffusers.DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                            prediction_type="v_prediction").save_pretrained(path / "scheduler")
    index = {"_class_name": "LatentPipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "DDIMScheduler"]}
    (path / "model_index.json").write_text(json.dumps(index))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n\n" + "\n".join(PROMPTS[2:]) + "\n")   # a blank line is skipped
    captions = root / "captions.json"
    captions.write_text(json.dumps({"images": [], "annotations": [{"image_id": i, "caption": p + " "}
                                                                  for i, p in enumerate(PROMPTS)]}))
    return {"text": text_pipeline(root / "sd-tiny", root), "class": latent_folder(root / "class-tiny", 3),
            "uncond": latent_folder(root / "uncond-tiny", None), "prompts": prompts, "captions": captions,
            "root": root}


@pytest.fixture(scope="module")
def text(models):
    return load_source("diffusers", checkpoint=str(models["text"]), prompts=str(models["prompts"]),
                       guidance_scale=3.0)


def unet_calls(source) -> list[int]:
    """Batch sizes of every UNet forward from now on."""
    calls: list[int] = []
    source.networks[0].register_forward_hook(lambda module, args, kwargs, out: calls.append(len(args[0])),
                                             with_kwargs=True)
    return calls


def test_text_pipeline_loads_samples_and_caches_latent_teacher_targets(models, text, tmp_path):
    assert text.shape == (4, 8, 8) and text.num_prompts == 4 and text.num_classes == 0
    assert text.info["conditioning"] == "text" and text.info["model_type"] == "noise"
    # The schedule is the scheduler's own (scaled_linear betas).
    ac = diffusers.DDPMScheduler.from_pretrained(models["text"], subfolder="scheduler").alphas_cumprod.double()
    torch.testing.assert_close(text.noise_schedule.marginal_alpha(torch.tensor(0.3, dtype=torch.float64)) ** 2,
                               ac[299], rtol=1e-6, atol=0)
    assert repr(get_dataset("diffusers").noise_schedule(checkpoint=str(models["text"]))) == repr(text.noise_schedule)
    data = generate_teacher(text, split_seeds("train", 5), TeacherConfig(nfe=6), tmp_path / "cache")
    assert data.targets.shape == (5, 4, 8, 8) and torch.isfinite(data.targets).all()
    assert data.labels.tolist() == text.labels(split_seeds("train", 5)).tolist()
    images = text.images(data.targets)
    assert images.shape == (5, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert isinstance(text.make_metric(), TeacherDistance)   # no --fid-reference
    # The cache key is the model: the same folder loaded again hits it, another guidance scale does not.
    again = load_source("diffusers", checkpoint=str(models["text"]), prompts=str(models["prompts"]),
                        guidance_scale=3.0)
    other = load_source("diffusers", checkpoint=str(models["text"]), prompts=str(models["prompts"]))
    assert again.identity == text.identity != other.identity and other.info["guidance_scale"] == 7.5


def test_prompts_pair_with_seeds_reproducibly_and_are_encoded_once(models, text):
    seeds = split_seeds("eval", 40)
    labels = text.labels(seeds)
    assert labels.tolist() == text.labels(seeds[:10]).tolist() + text.labels(seeds[10:]).tolist()
    assert set(labels.tolist()) == {0, 1, 2, 3}
    coco = load_source("diffusers", checkpoint=str(models["text"]), prompts=str(models["captions"]),
                       guidance_scale=3.0)
    assert coco.identity == text.identity and coco.labels(seeds).tolist() == labels.tolist()
    # Each prompt goes through the text encoder once; the embeddings are diffusers' own.
    encoder = coco.networks[2]
    batches: list[int] = []
    encoder.register_forward_hook(lambda module, args, out: batches.append(len(args[0])))
    x = coco.latents(seeds[:6])
    for _ in range(2):
        coco.model_fn_for(labels[:6])(x, torch.tensor(0.5))
    assert sum(batches) == len(set(labels[:6].tolist())) + 1   # the prompts used, and the empty prompt
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(models["text"], safety_checker=None)
    cond, uncond = pipe.encode_prompt(PROMPTS[:2], "cpu", 1, True, ["", ""])
    from ats.models.pipeline import PromptEmbeddings
    mine = PromptEmbeddings(PROMPTS, pipe.tokenizer, pipe.text_encoder)
    torch.testing.assert_close(mine(torch.tensor([0, 1])), cond)
    torch.testing.assert_close(mine.empty.expand(2, -1, -1), uncond)


def test_guidance_is_one_batched_call_equal_to_the_two_call_formula(models, text):
    plain = load_source("diffusers", checkpoint=str(models["text"]), prompts=str(models["prompts"]),
                        guidance_scale=1.0)
    seeds = split_seeds("train", 3)
    x, labels, t = text.latents(seeds, torch.float32), text.labels(seeds), torch.tensor(0.6)
    calls = unet_calls(text)
    with torch.no_grad():
        guided = text.model_fn_for(labels)(x, t)
        assert calls == [6]   # one call on [x, x] with [empty, prompt] embeddings
        eps_c = plain.model_fn_for(labels)(x, t)
        eps_u = plain.model_fn(x, t)   # no labels: the empty prompt
    torch.testing.assert_close(guided, eps_u + 3.0 * (eps_c - eps_u), rtol=1e-5, atol=1e-5)
    assert (eps_c - eps_u).abs().max() > 1e-3


def test_ddim_agrees_with_the_diffusers_pipeline_and_its_vae(models, text):
    """ats's DDIM on the times of diffusers' DDIMScheduler (t = (k + 1) / 1000 for training step
    k, ending at alphas_cumprod[0]) from the same latents and prompts equals the pipeline's
    own sampling, and ats's decoding its images."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(models["text"], safety_checker=None)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=False)
    pipe.set_progress_bar_config(disable=True)
    seeds = split_seeds("eval", 3)
    x, labels = text.latents(seeds, torch.float32), text.labels(seeds)
    prompts = [PROMPTS[i] for i in labels.tolist()]
    steps = 6
    pipe.scheduler.set_timesteps(steps)
    ts = torch.cat([(pipe.scheduler.timesteps.double() + 1) / 1000, torch.tensor([1 / 1000.], dtype=torch.float64)])
    with torch.no_grad():
        ours = sample(text.model_fn_for(labels), text.noise_schedule, x, ts.float(), "ddim")
        theirs = pipe(prompts, num_inference_steps=steps, guidance_scale=3.0, latents=x.clone(),
                      output_type="latent").images
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=3.0, latents=x.clone(),
                      output_type="pt").images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(text.images(ours) / 2 + 0.5, images, rtol=1e-4, atol=1e-4)


def test_class_conditional_and_unconditional_latent_folders(models, tmp_path):
    cls = load_source("diffusers", checkpoint=str(models["class"]))
    assert cls.num_classes == 3 and cls.info["conditioning"] == "class" and cls.info["model_type"] == "v"
    seeds = split_seeds("train", 6)
    x, labels = cls.latents(seeds, torch.float32), cls.labels(seeds)
    assert labels.tolist() == cls.labels(seeds).tolist() and set(labels.tolist()) <= {0, 1, 2}
    with torch.no_grad():
        a = cls.model_fn_for(torch.zeros(6, dtype=torch.long))(x, torch.tensor(0.5))
        b = cls.model_fn_for(torch.full((6,), 2))(x, torch.tensor(0.5))
    assert (a - b).abs().max() > 1e-4   # the label reaches the network
    data = generate_teacher(cls, seeds, TeacherConfig(nfe=5), tmp_path / "cache")
    assert data.labels.tolist() == labels.tolist() and torch.isfinite(data.targets).all()
    uncond = load_source("diffusers", checkpoint=str(models["uncond"]))
    assert uncond.num_classes == 0 and uncond.labels(seeds) is None and uncond.info["conditioning"] == "unconditional"
    out = generate_teacher(uncond, seeds, TeacherConfig(nfe=5), tmp_path / "cache").targets
    assert out.shape == (6, 4, 8, 8) and uncond.images(out).shape == (6, 3, 16, 16)
    with pytest.raises(ValueError, match="--prompts is for text-to-image pipelines.*has no text_encoder/"):
        load_source("diffusers", checkpoint=str(models["class"]), prompts=str(models["prompts"]))
    with pytest.raises(ValueError, match="--guidance-scale needs a text-to-image pipeline"):
        load_source("diffusers", checkpoint=str(models["uncond"]), guidance_scale=2.0)


def test_a_unet2dmodel_folder_is_a_diffusers_dataset_too(tmp_path):
    from test_cifar10 import make_checkpoint
    make_checkpoint(tmp_path / "ddpm")
    source = load_source("diffusers", checkpoint=str(tmp_path / "ddpm"))
    assert source.shape == (3, 8, 8) and source.decode is None and isinstance(source.make_metric(), TeacherDistance)
    with pytest.raises(ValueError, match="--prompts is for text-to-image pipelines"):
        load_source("diffusers", checkpoint=str(tmp_path / "ddpm"), prompts="p.txt")


def edited(models, tmp_path, name: str, edit) -> Path:
    """A copy of the text pipeline's JSON files (no weights needed to be refused) with ``edit``
    applied to its parsed model_index.json."""
    folder = tmp_path / name
    for part in ("unet", "vae", "scheduler"):
        (folder / part).mkdir(parents=True)
        for f in (models["text"] / part).glob("*.json"):
            (folder / part / f.name).write_text(f.read_text())
    index = json.loads((models["text"] / "model_index.json").read_text())
    edit(index)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_pipelines_ats_cannot_drive_get_one_line_errors(models, tmp_path):
    def refused(folder, match):
        with pytest.raises(ValueError, match=match) as e:
            load_source("diffusers", checkpoint=str(folder), prompts=str(models["prompts"]))
        assert "\n" not in str(e.value)
        return str(e.value)

    sd3 = edited(models, tmp_path, "sd3", lambda i: (i.pop("unet"), i.update(
        _class_name="StableDiffusion3Pipeline", transformer=["diffusers", "SD3Transformer2DModel"])))
    message = refused(sd3, r"StableDiffusion3Pipeline\): its denoiser is a SD3Transformer2DModel \(transformer/\)")
    assert "UNet2DConditionModel" in message and "AutoencoderKL" in message   # what ats supports
    refused(edited(models, tmp_path, "novae", lambda i: i.update(vae=[None, None])), r"has no vae/ \(it has ")
    refused(edited(models, tmp_path, "sdxl", lambda i: i.update(text_encoder_2=["transformers",
                                                                                 "CLIPTextModelWithProjection"])),
            "two text encoders")
    flow = edited(models, tmp_path, "flow", lambda i: None)
    (flow / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}))
    refused(flow, "FlowMatchEulerDiscreteScheduler is a flow-matching scheduler")
    with pytest.raises(ValueError, match="holds neither model_index.json"):
        load_source("diffusers", checkpoint=str(tmp_path))
    with pytest.raises(ValueError, match="dataset diffusers needs --checkpoint DIR"):
        load_source("diffusers")


def test_a_missing_optional_dependency_names_the_extra(models, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)   # as if it were not installed
    result = CliRunner().invoke(main, ["teacher", "--dataset", "diffusers", "--checkpoint", str(models["text"]),
                                       "--prompts", str(models["prompts"])])
    assert result.exit_code == 2 and "needs transformers: pip install 'ats[diffusers]'" in result.output


def test_prompts_files_errors(models, tmp_path):
    checkpoint = str(models["text"])
    with pytest.raises(ValueError, match="a text-to-image pipeline needs --prompts FILE"):
        load_source("diffusers", checkpoint=checkpoint)
    with pytest.raises(ValueError, match=r"prompts file .*missing.txt does not exist; give a file with one prompt"):
        load_source("diffusers", checkpoint=checkpoint, prompts=str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"annotations": [{"caption": "a cat"},]}')
    with pytest.raises(ValueError, match=r"bad.json is not valid JSON \(.*line 1\); give one prompt per line, or a "
                                         r"COCO captions JSON"):
        load_source("diffusers", checkpoint=checkpoint, prompts=str(bad))
    bad.write_text('{"images": []}')
    with pytest.raises(ValueError, match='has no "annotations" list'):
        load_source("diffusers", checkpoint=checkpoint, prompts=str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_source("diffusers", checkpoint=checkpoint, prompts=str(empty))
    problems = get_dataset("diffusers").problems(checkpoint=checkpoint, fid_reference=str(tmp_path / "ref.npz"))
    assert any("needs --prompts FILE" in p for p in problems) and any("ref.npz does not exist" in p for p in problems)
    result = CliRunner().invoke(main, ["teacher", "--dataset", "diffusers", "--checkpoint", checkpoint, "--prompts",
                                       str(bad)])
    assert result.exit_code == 2 and 'has no "annotations" list' in result.output


def model_args(models, kind: str = "text") -> list[str]:
    """The dataset options of the text pipeline (guidance scale 2) or the class-conditional folder."""
    if kind == "class":
        return ["--dataset", "diffusers", "--checkpoint", str(models["class"])]
    return ["--dataset", "diffusers", "--checkpoint", str(models["text"]), "--prompts", str(models["prompts"]),
            "--guidance-scale", "2"]


def fit_args(models, tmp_path, method: str, *options: str, kind: str = "text") -> list[str]:
    return ["fit", "--method", method, *model_args(models, kind), "--solver", "dpm_solver++", "--nfe", "3",
            "--n-train", "4", "--n-valid", "4", "--n-eval", "6", "--teacher-nfe", "8", "--cache",
            str(models["root"] / "cache"), "--out", str(tmp_path / method),
            *(a for o in options for a in ("--option", o))]


def test_fit_ld3_through_the_cli_ranks_by_the_teacher_distance_and_samples_images(models, tmp_path):
    result = CliRunner().invoke(main, fit_args(models, tmp_path, "ld3", "epochs=2", "batch_size=4"))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"{TEACHER_L2} ± 95 %" in text and f"ranked by the {TEACHER_L2}" in text
    assert "best method ld3" in text and "saved to" in text
    schedule = json.loads((tmp_path / "ld3" / "schedule.json").read_text())
    assert len(schedule["timesteps"]) == 4 and schedule["info"]["source"] == "pipeline:sd-tiny-cfg2"
    grid = tmp_path / "grid.png"
    result = CliRunner().invoke(main, ["sample", "--schedule", str(tmp_path / "ld3" / "schedule.json"),
                                       *model_args(models), "--n", "4", "--out", str(grid)])
    assert result.exit_code == 0, result.output
    from PIL import Image
    assert Image.open(grid).size == (2 * (16 * 4 + 1) + 1,) * 2   # 2 x 2 decoded 16 x 16 images, drawn 4x


def test_fit_a_predictor_through_the_cli(models, tmp_path):
    result = CliRunner().invoke(main, fit_args(models, tmp_path, "oneshot", "epochs=1", "batch_size=4",
                                               'ld3={"epochs": 1, "batch_size": 4}'))
    assert result.exit_code == 0, result.output
    from ats.methods import load_result
    predictor = load_result(tmp_path / "oneshot" / "result.pt").predictor
    assert predictor.config["shape"] == [4, 8, 8] and predictor.config["num_classes"] == 0
    assert "best method oneshot" in " ".join(result.output.split())
    model = model_args(models)
    result = CliRunner().invoke(main, ["export", "--schedule", str(tmp_path / "oneshot" / "result.pt"), *model,
                                       "--format", "torch", "--out", str(tmp_path / "exported")])
    assert result.exit_code == 2 and "is text-conditional" in result.output and "--format diffusers" in result.output
    result = CliRunner().invoke(main, ["sample", "--schedule", str(tmp_path / "oneshot" / "result.pt"), *model,
                                       "--n", "2", "--label", "0", "--out", str(tmp_path / "s.png")])
    assert result.exit_code == 2 and "each seed has its own prompt" in result.output


def fit_and_export(models, tmp_path, kind: str, *options: str) -> dict:
    """`ats fit --method ld3` (dpm_solver++, NFE 3) on the model ``kind`` and `ats export
    --format diffusers` of its schedule.json, through the CLI; the exported JSON."""
    done = CliRunner().invoke(main, fit_args(models, tmp_path, "ld3", "epochs=2", "batch_size=4", *options, kind=kind))
    assert done.exit_code == 0, done.output
    out = tmp_path / "exported.json"
    done = CliRunner().invoke(main, ["export", "--schedule", str(tmp_path / "ld3" / "schedule.json"),
                                     *model_args(models, kind), "--format", "diffusers", "--out", str(out)])
    assert done.exit_code == 0, done.output
    return json.loads(out.read_text())


def snippet_scope(export: dict) -> dict:
    """What the export's script defines when it runs: the scheduler with the schedule set, ``timesteps``, ..."""
    scope: dict = {}
    exec(compile(export["snippet"], "snippet", "exec"), scope)
    return scope


def assert_ats_samples(theirs: torch.Tensor, source, result_path: Path, export: dict, x: torch.Tensor,
                       labels: torch.Tensor) -> None:
    """``theirs`` (diffusers from ``x``) is what ats samples with the fitted result on the
    exported timesteps= (the learned times rounded to training steps; the network at the
    learned conditioning times), up to float32 rounding (measured 7e-7 and 7e-6 of the largest
    value); and the rounding moves ats's samples on the learned times little (0.14 %)."""
    from ats.methods import load_result
    result = load_result(result_path)
    rounded = (torch.tensor(export["timesteps"] + [0], dtype=torch.float64) + 1) / 1000
    cond = None if result.cond_timesteps is None else result.cond_timesteps.float()
    with torch.no_grad():
        ours, learned = (sample(source.model_fn_for(labels), source.noise_schedule, x, ts.float(), result.solver,
                                order=result.order, cond_timesteps=cond) for ts in (rounded, result.timesteps))
    size = ours.abs().max()
    assert (ours - x).abs().max() > 0.1 * size, "the samples did not move"
    assert (theirs - ours).abs().max() < 3e-5 * size
    assert export["timesteps_error_lambda"] < 0.01 and (learned - ours).abs().max() < 0.01 * size


def test_an_exported_schedule_runs_back_through_the_text_pipeline(models, tmp_path):
    """`ats fit` LD3 and `ats export` on the text-to-image pipeline; the script's
    DPMSolverMultistepScheduler (the pipeline's scheduler/ config with the export's flags),
    handed to the StableDiffusionPipeline with the exported timesteps as the script's comment
    says, samples from ats's latents and prompts what ats samples on those times. The fit
    learns no conditioning offsets (learn_xi=false): a pipeline calls its UNet at the
    scheduler's own timesteps (offsets: the next test's loop by hand)."""
    export = fit_and_export(models, tmp_path, "text", "learn_xi=false")
    assert export["scheduler"]["class"] == "DPMSolverMultistepScheduler" and "model_timesteps" not in export
    assert "pipe(prompt, timesteps=timesteps)" in export["snippet"]
    scope = snippet_scope(export)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(models["text"], scheduler=scope["scheduler"],
                                                             safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    source = load_source("diffusers", checkpoint=str(models["text"]), prompts=str(models["prompts"]),
                         guidance_scale=2.0)
    seeds = split_seeds("eval", 3)
    x, labels = source.latents(seeds, torch.float32), source.labels(seeds)
    with torch.no_grad():
        theirs = pipe([PROMPTS[i] for i in labels.tolist()], timesteps=scope["timesteps"], guidance_scale=2.0,
                      latents=x.clone(), output_type="latent").images
    assert pipe.scheduler.timesteps.tolist() == export["timesteps"]
    assert_ats_samples(theirs, source, tmp_path / "ld3" / "result.pt", export, x, labels)


def test_an_exported_schedule_with_offsets_runs_back_by_hand_on_the_class_folder(models, tmp_path):
    """`ats fit` LD3 (with its conditioning offsets) and `ats export` on the class-conditional
    latent folder (v-prediction); the script's scheduler stepped by hand, the UNet called at
    model_timesteps with each seed's class and its output converted as the export says, samples
    what ats samples on the exported times."""
    export = fit_and_export(models, tmp_path, "class")
    assert {"model_timesteps", "model_output_scale", "model_sample_weight"} <= set(export)
    scope = snippet_scope(export)
    source = load_source("diffusers", checkpoint=str(models["class"]))
    unet, scheduler = source.networks[0], scope["scheduler"]
    seeds = split_seeds("eval", 3)
    x, labels = source.latents(seeds, torch.float32), source.labels(seeds)
    context = torch.zeros(len(x), 1, unet.config.cross_attention_dim)   # no text: one all-zero token, as ats's
    y = x
    with torch.no_grad():
        for i, t in enumerate(scope["timesteps"]):
            out = unet(y, scope["model_timesteps"][i], encoder_hidden_states=context, class_labels=labels).sample
            out = out * scope["model_output_scale"][i] + scope["model_sample_weight"][i] * y
            y = scheduler.step(out, t, y).prev_sample
    assert_ats_samples(y, source, tmp_path / "ld3" / "result.pt", export, x, labels)


def test_a_predictor_on_the_class_folder_fits_samples_and_exports(models, tmp_path):
    """A one-shot predictor on the class-conditional latent folder through `ats fit`, `ats
    sample` and `ats export --format torch`; the exported sampler gives ats's samples."""
    done = CliRunner().invoke(main, fit_args(models, tmp_path, "oneshot", "epochs=1", "batch_size=4", "fallback=false",
                                             'ld3={"epochs": 1, "batch_size": 4}', kind="class"))
    assert done.exit_code == 0, done.output
    result_path = tmp_path / "oneshot" / "result.pt"
    done = CliRunner().invoke(main, ["sample", "--schedule", str(result_path), *model_args(models, "class"), "--n",
                                     "4", "--out", str(tmp_path / "s.png")])
    assert done.exit_code == 0, done.output
    folder = tmp_path / "exported"
    done = CliRunner().invoke(main, ["export", "--schedule", str(result_path), *model_args(models, "class"),
                                     "--format", "torch", "--batch", "2", "--out", str(folder)])
    assert done.exit_code == 0, done.output
    import importlib.util
    spec = importlib.util.spec_from_file_location("class_predictor", folder / "ats_predictor.py")
    exported = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exported)
    from ats.methods import load_result
    from ats.methods.predictors import PredictorSampler
    result = load_result(result_path)
    source = load_source("diffusers", checkpoint=str(models["class"]))
    seeds = split_seeds("eval", 3)
    x, labels = source.latents(seeds, source.dtype), source.labels(seeds)
    x0, times = exported.sample(x, labels)
    with torch.no_grad():
        ours, our_times = PredictorSampler(result.predictor, source, result.solver, result.order)(x, labels)
    assert (times - our_times).abs().max() < 1e-6 and (x0 - ours).abs().max() < 1e-4 * ours.abs().max()


def flow_folder(root: Path) -> Path:
    from test_flow import make_flow_checkpoint
    return make_flow_checkpoint(root / "flow-tiny")


@pytest.mark.parametrize("kind", ["class", "text", "flow"])
def test_search_one_trial_then_evaluate_on_each_model_kind(models, tmp_path, kind):
    """`ats search` (one LD3 trial, ranked by the teacher distance), then `ats evaluate` of its
    run on fresh seeds, on a class-conditional latent folder, a text-to-image pipeline and a
    flow-matching UNet2DModel."""
    model = {"class": {"checkpoint": str(models["class"])},
             "text": {"checkpoint": str(models["text"]), "prompts": str(models["prompts"]), "guidance_scale": 2.0},
             "flow": {"checkpoint": str(flow_folder(tmp_path))}}[kind]
    study = {"name": "latent", "dataset": "diffusers", "model": model, "solvers": ["dpm_solver++"], "nfes": [3],
             "teacher": {"solver": "uni_pc", "nfe": 6, "discretization": "edm"},
             "data": {"n_train": 4, "n_valid": 4, "n_select": 6, "n_eval": 6}, "baselines": ["logSNR"],
             "methods": {"ld3": {"options": {"epochs": 1, "batch_size": 4}}}, "trials": 1, "seed": 0,
             "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0, "max_concurrent": 1}}
    (tmp_path / "latent.yaml").write_text(yaml.safe_dump(study))
    from test_search import env, runs_of
    res = subprocess.run([sys.executable, "-m", "ats.cli", "search", "--study", "latent.yaml", "--no-live"],
                         cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = " ".join(res.stdout.split())
    assert TEACHER_L2 in out and "best method ld3" in out and "ld3 dpm_solver++ NFE 3: L2 select" in out
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, _, (parent,), children = runs_of(uri, "latent")
    assert sorted(c.data.tags["ats.kind"] for c in children) == ["baseline", "trial"]
    assert all(c.info.status == "FINISHED" and c.data.metrics["n_select"] == 6 for c in children)
    folder = next((tmp_path / "runs").iterdir())
    fids = json.loads(next(folder.rglob("fid.json")).read_text())
    assert fids["select"]["metric"] == TEACHER_L2
    from PIL import Image
    side = 16 if kind != "flow" else 8   # latent folders decode 8 x 8 latents to 16 x 16 images
    side_by_side = Image.open(folder / "summary" / "samples-dpm_solver++-nfe3.png")
    assert side_by_side.size[1] == 14 + 2 * (side * 4 + 1) + 1   # names over 2 x 3 grids of images
    (trial,) = [c for c in children if c.data.tags["ats.kind"] == "trial"]
    done = CliRunner().invoke(main, ["evaluate", "--run", trial.info.run_id, "--tracking-uri", uri, "--n", "6",
                                     "--cache", str(tmp_path / ".ats-cache" / "teacher"), "--baselines", "logSNR",
                                     "--json", str(tmp_path / "rows.json")])
    assert done.exit_code == 0, done.output
    rows = {r["name"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert {"ld3", "logSNR"} <= set(rows) and TEACHER_L2 in " ".join(done.output.split())


def test_fit_sample_and_export_a_flow_model_through_the_cli(tmp_path):
    """LD3 and a one-shot predictor on a flow-matching UNet2DModel from the CLI; the exported
    schedule's script runs in diffusers' FlowMatchEulerDiscreteScheduler."""
    flow = str(flow_folder(tmp_path))
    common = ["--dataset", "diffusers", "--checkpoint", flow, "--solver", "ddim", "--nfe", "3", "--n-train", "4",
              "--n-valid", "4", "--n-eval", "6", "--teacher-nfe", "8", "--cache", str(tmp_path / "cache")]
    for method, options in (("ld3", ["epochs=2", "batch_size=4"]), ("oneshot", ["epochs=1", "batch_size=4",
                                                                              'ld3={"epochs": 1, "batch_size": 4}'])):
        done = CliRunner().invoke(main, ["fit", "--method", method, *common, "--out", str(tmp_path / method),
                                         *(a for o in options for a in ("--option", o))])
        assert done.exit_code == 0, done.output
        assert "saved to" in done.output
    done = CliRunner().invoke(main, ["sample", "--schedule", str(tmp_path / "oneshot" / "result.pt"), "--dataset",
                                     "diffusers", "--checkpoint", flow, "--n", "4", "--out", str(tmp_path / "s.png")])
    assert done.exit_code == 0, done.output
    done = CliRunner().invoke(main, ["export", "--schedule", str(tmp_path / "ld3" / "schedule.json"), "--dataset",
                                     "diffusers", "--checkpoint", flow, "--format", "diffusers", "--out",
                                     str(tmp_path / "export")])
    assert done.exit_code == 0, done.output
    assert "FlowMatchEulerDiscreteScheduler" in " ".join(done.output.split())


def test_ays_is_a_baseline_of_stable_diffusion_pipelines_only(models, text, tmp_path):
    """A StableDiffusionPipeline folder offers diffusers' Align Your Steps list as the ``ays``
    baseline (10 steps: the list itself); other models refuse it in one line."""
    from diffusers.schedulers import AysSchedules
    from ats.evaluate import baseline_problem, baseline_result
    assert text.info["ays_family"] == "sd15"
    ays = baseline_result(text, "ays", "dpm_solver++", 10, None)
    steps = (ays.timesteps[:-1] * 1000 - 1).round().long().tolist()
    assert steps == list(AysSchedules["StableDiffusionTimesteps"])
    assert baseline_problem(text, ays, "ays") is None
    from test_cifar10 import make_checkpoint
    make_checkpoint(tmp_path / "ddpm")
    other = load_source("diffusers", checkpoint=str(tmp_path / "ddpm"))
    assert "Stable Diffusion 1.5, SDXL" in baseline_problem(other, ays, "ays")
    with pytest.raises(ValueError, match="leave ays out"):
        baseline_result(other, "ays", "dpm_solver++", 10, None)
