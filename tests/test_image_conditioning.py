"""Image-conditioned diffusion (SR3, Palette, Cascaded Diffusion) through training, sampling and the CLI.

What is observed: the network's input channels (the condition reaches it, in training and in
sampling), the condition the loop builds (exactly the area downsample or the paired row of the
same index), the samples (they change with the condition alone), a cascade's k-th image made
alone, and the one-line refusals that write nothing. ddpm.conditions' maths is in
tests/test_image_conditions.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm.train
from ddpm.cli import main
from ddpm.conditions import ImageCondition, area_downsample, luminance, upsample
from ddpm.generate import load_diffusion
from ddpm.models import Unet, UnetConfig
from ddpm import GaussianDiffusion

from helpers.spies import no_sample_grids, spy_network

TINY = ["--steps", "2", "--batch-size", "4", "--dim", "8", "--dim-mults", "1", "--attention-resolutions",
        "--timesteps", "30", "--num-images", "2", "--device", "cpu", "--quiet", "--checkpoint-every", "0"]
SAMPLE = ["--steps", "3", "--device", "cpu", "--quiet"]


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect a non-zero exit and exactly one ``error:`` line on stderr, return it."""
    try:
        got = main(argv)
    except SystemExit as exc:
        got = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert got not in (0, None) and len(err) == 1 and "error:" in err[0], (got, err)
    return err[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A 2x super-resolution run on the 8x8 digits and a 4x4 unconditional base (cascade stage 0)."""
    root = tmp_path_factory.mktemp("runs")
    with no_sample_grids():
        assert main(["train", "--task", "super-resolution", "--scale", "2", *TINY, "--out", str(root / "sr")]) == 0
        assert main(["train", "--image-size", "4", *TINY, "--out", str(root / "base")]) == 0
    return {"sr": root / "sr", "base": root / "base"}


class _Recorder:
    """Wraps ddpm.train.training_condition: the targets x0, the paired rows and the c it returned."""

    def __init__(self, original):
        self.original, self.calls = original, []

    def __call__(self, condition, x0, paired, *args, **kwargs):
        c = self.original(condition, x0, paired, *args, **kwargs)
        self.calls.append((x0.clone(), None if paired is None else paired.clone(), c.clone()))
        return c


def _train_spied(monkeypatch, argv: list[str]):
    recorder = _Recorder(ddpm.train.training_condition)
    monkeypatch.setattr(ddpm.train, "training_condition", recorder)
    with no_sample_grids(), spy_network() as calls:
        assert main(["train", *argv]) == 0
    return recorder.calls, calls


# ----------------------------------------------------------------------------- training

def test_training_condition_is_the_area_downsample_and_reaches_the_network(tmp_path, monkeypatch):
    made, calls = _train_spied(monkeypatch, ["--task", "super-resolution", "--scale", "2", *TINY,
                                             "--out", str(tmp_path / "run")])
    assert len(made) == 2 and len(calls) == 2
    for (x0, _, c), call in zip(made, calls):
        torch.testing.assert_close(c, upsample(area_downsample(x0, 2), (8, 8)), rtol=0, atol=0)
        assert call.x.shape[1] == 2                                  # [x_t, c]
        torch.testing.assert_close(call.x[:, 1:], c, rtol=0, atol=0)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["condition"]
    assert saved == {"task": "super-resolution", "channels": 1, "scale": 2, "noise": 0.0}


def test_colorize_condition_is_the_luminance(tmp_path, monkeypatch):
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", images=rgb)
    made, calls = _train_spied(monkeypatch, ["--task", "colorize", "--data", str(tmp_path / "rgb.npz"),
                                             "--preset", "digits", *TINY, "--out", str(tmp_path / "run")])
    for (x0, _, c), call in zip(made, calls):
        torch.testing.assert_close(c, luminance(x0), rtol=0, atol=0)
        assert call.x.shape[1] == 4
        torch.testing.assert_close(call.x[:, 3:], c, rtol=0, atol=0)


def _index_folders(root: Path, n: int, shuffle: bool = False) -> tuple[Path, Path]:
    """Targets and conditions whose pixels encode their index k (value 10 k); ``shuffle`` permutes the
    conditions' contents among the same file names (a broken pairing the test must see)."""
    targets, conditions = root / "targets", root / "conditions"
    targets.mkdir()
    conditions.mkdir()
    contents = np.random.default_rng(1).permutation(n) if shuffle else np.arange(n)
    for k in range(n):
        Image.fromarray(np.full((8, 8), 10 * k, np.uint8)).save(targets / f"{k:03d}.png")
        Image.fromarray(np.full((8, 8), 10 * contents[k], np.uint8)).save(conditions / f"{k:03d}.png")
    return targets, conditions


def _pairs_match(made) -> bool:
    return all(torch.equal(x0, paired) for x0, paired, _ in made)


@pytest.mark.parametrize("shuffle", [False, True])
def test_paired_rows_follow_the_targets_indices(tmp_path, monkeypatch, shuffle):
    targets, conditions = _index_folders(tmp_path, 12, shuffle)
    made, calls = _train_spied(monkeypatch, ["--task", "paired", "--data", str(targets), "--condition-data",
                                             str(conditions), "--preset", "digits", "--hflip", *TINY,
                                             "--steps", "4", "--out", str(tmp_path / "run")])
    assert len(made) == 4
    assert _pairs_match(made) is not shuffle          # a shuffled pairing is seen, an intact one passes
    for (_, paired, _), call in zip(made, calls):
        torch.testing.assert_close(call.x[:, 1:], paired, rtol=0, atol=0)


@pytest.mark.parametrize("source", ["prepared", "hub"])
def test_paired_rows_of_a_prepared_or_hub_dataset_follow_row_order(tmp_path, monkeypatch, source):
    """Sources other than folders pair by row: targets from a prepared dataset (read lazily) with
    conditions from an .npz, or targets from an .npz with conditions from a saved Hub dataset."""
    index = np.repeat(np.arange(12, dtype=np.uint8)[:, None, None, None] * 10, 8, 1).repeat(8, 2)   # [12, 8, 8, 1]
    np.savez(tmp_path / "rows.npz", images=index)
    if source == "prepared":
        assert main(["prepare", "--data", str(tmp_path / "rows.npz"), "--out", str(tmp_path / "prep"), "--quiet"]) == 0
        data, conditions = tmp_path / "prep", tmp_path / "rows.npz"
    else:
        datasets = pytest.importorskip("datasets")
        table = datasets.Dataset.from_dict({"image": [Image.fromarray(x[..., 0]) for x in index]},
                                           features=datasets.Features({"image": datasets.Image()}))
        table.save_to_disk(str(tmp_path / "saved"))
        data, conditions = tmp_path / "rows.npz", tmp_path / "saved"
    made, calls = _train_spied(monkeypatch, ["--task", "paired", "--data", str(data), "--condition-data",
                                             str(conditions), "--preset", "digits", *TINY, "--steps", "4",
                                             "--out", str(tmp_path / "run")])
    assert len(made) == 4 and all(torch.equal(x0, paired[:, :1]) for x0, paired, _ in made)
    for (_, paired, _), call in zip(made, calls):
        torch.testing.assert_close(call.x[:, 1:], paired, rtol=0, atol=0)


def test_condition_noise_adds_the_level_channel_and_resume_is_exact(tmp_path, monkeypatch):
    argv = ["--task", "super-resolution", "--scale", "2", "--condition-noise", "0.3", *TINY, "--steps", "2"]
    made, calls = _train_spied(monkeypatch, [*argv, "--out", str(tmp_path / "whole")])
    for (x0, _, c), call in zip(made, calls):
        assert c.shape[1] == 2 and call.x.shape[1] == 3
        level = c[:, 1:]
        assert float(level.min()) >= 0 and float(level.max()) <= 0.3
        assert torch.all(level == level[:, :, :1, :1])          # one constant plane per image
    with no_sample_grids():
        assert main(["train", *argv, "--steps", "1", "--checkpoint-every", "1", "--out", str(tmp_path / "half")]) == 0
        assert main(["train", "--resume", str(tmp_path / "half"), "--steps", "2", "--quiet"]) == 0
    whole, _ = load_diffusion(tmp_path / "whole", weights="raw")
    half, _ = load_diffusion(tmp_path / "half", weights="raw")
    for (name, a), b in zip(whole.model.state_dict().items(), half.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_condition_table_in_the_configuration_file_under_the_options(tmp_path, capsys):
    config = tmp_path / "sr.toml"
    config.write_text('[condition]\ntask = "super-resolution"\nscale = 4\nnoise = 0.2\n')
    assert main(["train", "--config", str(config), *TINY, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["condition"] == {"task": "super-resolution", "channels": 1,
                                                                "scale": 4, "noise": 0.2}
    assert main(["train", "--config", str(config), "--scale", "2", *TINY, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["condition"]["scale"] == 2          # the option wins
    for table, words in (('factor = 4', "factor"), ('task = "super-resolution"\nscale = "4"', "whole number")):
        config.write_text(f"[condition]\n{table}\n")
        assert words in one_line_error(capsys, ["train", "--config", str(config), *TINY, "--dry-run"])


FINE_TUNE = ["--steps", "2", "--batch-size", "4", "--num-images", "2", "--device", "cpu", "--quiet",
             "--checkpoint-every", "0"]


def test_fine_tuning_keeps_the_checkpoints_condition(runs, tmp_path, monkeypatch, capsys):
    made, calls = _train_spied(monkeypatch, ["--init", str(runs["sr"]), *FINE_TUNE, "--out", str(tmp_path / "ft")])
    assert len(made) == 2 and all(call.x.shape[1] == 2 for call in calls)          # [x_t, c] reach the network
    for x0, _, c in made:
        torch.testing.assert_close(c, upsample(area_downsample(x0, 2), (8, 8)), rtol=0, atol=0)
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["condition"] == {
        "task": "super-resolution", "channels": 1, "scale": 2, "noise": 0.0}
    out = tmp_path / "refused"
    for argv, words in ((["--init", str(runs["sr"]), "--scale", "4"], "contradicts"),
                        (["--init", str(runs["sr"]), "--task", "colorize"], "contradicts"),
                        (["--init", str(runs["base"]), "--task", "super-resolution", "--scale", "2"],
                         "not image-conditioned")):
        assert words in one_line_error(capsys, ["train", *argv, *FINE_TUNE, "--out", str(out)])
        assert not out.exists()


def test_fine_tuning_a_paired_model_takes_new_pairs_matched_by_path(tmp_path, monkeypatch, capsys):
    targets, conditions = _index_folders(tmp_path, 6)
    paired = ["--data", str(targets), "--preset", "digits"]
    with no_sample_grids():
        assert main(["train", "--task", "paired", "--condition-data", str(conditions), *paired, *TINY,
                     "--out", str(tmp_path / "base")]) == 0
    made, _ = _train_spied(monkeypatch, ["--init", str(tmp_path / "base"), "--condition-data", str(conditions),
                                         *paired, *FINE_TUNE, "--out", str(tmp_path / "ft")])
    assert len(made) == 2 and _pairs_match(made)
    assert "--condition-data" in one_line_error(capsys, ["train", "--init", str(tmp_path / "base"), *paired,
                                                         *FINE_TUNE, "--out", str(tmp_path / "refused")])


# ----------------------------------------------------------------------------- the Python API and sampling

def _api_diffusion(noise: float = 0.0) -> GaussianDiffusion:
    torch.manual_seed(0)
    condition = ImageCondition("super-resolution", 1, scale=2, noise=noise)
    model = Unet(UnetConfig(image_size=8, channels=1, dim=8, dim_mults=(1,), attention_resolutions=(),
                            norm_groups=4, in_channels=1 + condition.input_channels))
    with torch.no_grad():                      # the zero-initialised output layer made to answer
        for m in model.modules():
            if getattr(m, "zero_init", False):
                m.weight.normal_(0, 0.1)
    return GaussianDiffusion(model, image_size=8, channels=1, timesteps=30, condition=condition).eval()


def test_sampling_feeds_the_condition_and_it_alone_changes_the_samples(monkeypatch):
    diffusion = _api_diffusion()
    seen = []
    original = Unet.forward

    def forward(self, x, t, *args, **kwargs):
        seen.append(x.detach().clone())
        return original(self, x, t, *args, **kwargs)

    monkeypatch.setattr(Unet, "forward", forward)
    low_a = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    low_b = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(2))

    def draw(low):
        return diffusion.sample(condition=low, steps=3, generator=torch.Generator().manual_seed(0), progress=False)

    a = draw(low_a)
    assert len(seen) == 3 and all(x.shape[1] == 2 for x in seen)
    expected = upsample(low_a * 2 - 1, (8, 8))
    assert all(torch.equal(x[:, 1:], expected) for x in seen)
    assert torch.equal(draw(low_a), a)
    assert not torch.allclose(draw(low_b), a)
    loss = diffusion(torch.rand(2, 1, 8, 8), condition=low_a)      # the training call takes it too
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_the_api_refuses_what_does_not_fit():
    diffusion = _api_diffusion()
    with pytest.raises(Exception, match="image-conditioned"):
        diffusion.sample(batch_size=2, steps=2, progress=False)
    with pytest.raises(Exception, match="channel"):
        diffusion.sample(condition=torch.rand(2, 3, 4, 4), steps=2, progress=False)
    with pytest.raises(Exception, match="4x4"):
        diffusion.sample(condition=torch.rand(2, 1, 5, 5), steps=2, progress=False)


def test_cli_sample_with_a_condition(runs, tmp_path):
    out = tmp_path / "s"
    assert main(["sample", "--checkpoint", str(runs["sr"]), "--condition", "digits:3", "--num-images", "2",
                 *SAMPLE, "--out", str(out)]) == 0
    npz = np.load(out / "samples.npz")
    assert npz["images"].shape == (2, 8, 8, 1) and npz["conditions"].shape == (1, 4, 4, 1)
    assert npz["targets"].shape == (1, 8, 8, 1)
    record = json.loads((out / "record.json").read_text())
    assert record["condition"]["per_condition"] == 2 and record["condition"]["task"] == "super-resolution"


def test_a_cascade_regenerates_its_kth_image_alone(runs, tmp_path):
    common = ["sample", "--checkpoint", str(runs["base"]), "--then", str(runs["sr"]), *SAMPLE]
    assert main([*common, "--num-images", "3", "--out", str(tmp_path / "all")]) == 0
    assert main([*common, "--num-images", "1", "--start-index", "2", "--out", str(tmp_path / "one")]) == 0
    every, alone = np.load(tmp_path / "all" / "samples.npz"), np.load(tmp_path / "one" / "samples.npz")
    assert every["images"].shape == (3, 8, 8, 1) and every["stage_0"].shape == (3, 4, 4, 1)
    assert np.array_equal(every["images"][2:], alone["images"])
    assert np.array_equal(every["stage_0"][2:], alone["stage_0"])
    stages = json.loads((tmp_path / "all" / "record.json").read_text())["cascade"]
    assert [Path(s["checkpoint"]).parent.parent for s in stages] == [runs["base"], runs["sr"]]
    assert all("sampler" in s and "seed" in s for s in stages)


# ----------------------------------------------------------------------------- one line, nothing written

def test_bad_conditions_are_one_line_and_write_nothing(runs, tmp_path, capsys):
    np.savez(tmp_path / "five.npz", images=np.zeros((2, 5, 5, 1), np.uint8))
    np.savez(tmp_path / "rgb.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    out = tmp_path / "out"
    cases = [(["--checkpoint", str(runs["sr"]), "--condition", str(tmp_path / "five.npz")], "5x5"),
             (["--checkpoint", str(runs["sr"]), "--condition", str(tmp_path / "rgb.npz")], "channel"),
             (["--checkpoint", str(runs["base"]), "--condition", "digits:3"], "not image-conditioned"),
             (["--checkpoint", str(runs["sr"]), "--then", str(runs["sr"])], "starts from"),
             (["--checkpoint", str(runs["base"]), "--then", str(runs["base"])], "super-resolution"),
             (["--checkpoint", str(runs["base"]), "--then", str(runs["sr"]), "--then", str(runs["sr"])], "8x8")]
    for argv, words in cases:
        assert words in one_line_error(capsys, ["sample", *argv, *SAMPLE, "--out", str(out)])
        assert not out.exists()


def test_bad_training_options_are_one_line_and_write_nothing(tmp_path, capsys):
    targets, conditions = _index_folders(tmp_path, 4)
    (conditions / "003.png").rename(conditions / "009.png")
    out = tmp_path / "run"
    cases = [(["--task", "super-resolution", "--scale", "3"], "does not divide"),
             (["--task", "paired", "--data", str(targets), "--condition-data", str(conditions), "--preset",
               "digits"], "009"),
             (["--task", "paired"], "--condition-data"),
             (["--scale", "2"], "--task"),
             (["--resume", str(tmp_path), "--task", "colorize"], "--resume")]
    for argv, words in cases:
        assert words in one_line_error(capsys, ["train", *argv, *TINY, "--out", str(out)])
        assert not out.exists()


def test_export_to_diffusers_refuses_an_image_conditioned_model(runs, tmp_path, capsys):
    pytest.importorskip("diffusers")
    out = tmp_path / "pipe"
    assert "image-conditioned" in one_line_error(capsys, ["export", "--checkpoint", str(runs["sr"]), "--out", str(out)])
    assert not out.exists()


def test_eval_reports_the_model_beside_the_bicubic_baseline(runs, tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert main(["eval", "--checkpoint", str(runs["sr"]), "--data", "digits", "--num-images", "4", "--steps", "2",
                 "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    scores = json.loads(out.read_text())
    keys = ("psnr", "ssim", "consistency_psnr", "fast_fid")
    assert all(k in scores and f"baseline_{k}" in scores for k in keys), scores
    # The bicubic baseline, area-downsampled again, is close to its own low-resolution input.
    assert scores["baseline_consistency_psnr"] > 15
    assert scores["n"] == 4 and scores["task"] == "super-resolution"


@pytest.mark.parametrize("edit, words", [({"scale": 3}, "does not divide"), ({"task": "deblur"}, "unknown task"),
                                         ({"channels": 9}, "do not match")])
def test_checkpoint_condition_sections_are_validated(runs, tmp_path, edit, words):
    """The condition section is checked on load; one whose channels disagree with the weights is refused too."""
    from helpers.crafted import craft

    from ddpm.errors import CheckpointError

    src = sorted((runs["sr"] / "checkpoints").glob("*.safetensors"))[-1]
    bad = craft(src, tmp_path / "bad.safetensors", edit_meta=lambda meta: meta["config"]["condition"].update(edit))
    with pytest.raises(CheckpointError, match=words):
        load_diffusion(bad)
