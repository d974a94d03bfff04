"""Progressive distillation: the two-step target against explicit DDIM steps on an analytic Gaussian
model, the loss, and ``ddpm distill`` end to end (rounds, sampling defaults, resume, refusals)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm import denoiser as Dn
from ddpm import samplers as S
from ddpm.checkpoint import load_checkpoint, read_metadata
from ddpm.cli import main
from ddpm.config import DiffusionConfig, RunConfig
from ddpm.diffusion import predict_eps_from_x0
from ddpm.distill import (DistillConfig, DistillationObjective, distillation_weight, student_grid,
                          two_step_target)
from ddpm.errors import ConfigError
from ddpm.generate import generate, load_diffusion
from ddpm.models import preset_config
from ddpm.samplers import SamplingOptions
from ddpm.schedules import NoiseSchedule

F64 = torch.float64
SHAPE = (6, 1, 2, 2)


class IsotropicGaussianOracle:
    """The exactly optimal network for data ~ N(mu, s^2 I), at per-sample timesteps, predicting ``objective``.

    z_t = alpha x + sigma eps  =>  E[x | z_t] = mu + alpha s^2 (z_t - alpha mu) / (alpha^2 s^2 + sigma^2),
    and E[eps | z_t] = (z_t - alpha E[x | z_t]) / sigma (Eq. 4). With s = 0 the data is the point mu.
    """

    def __init__(self, schedule: NoiseSchedule, mu: float, s: float, objective: str = "eps"):
        self.abar, self.mu, self.s, self.objective = schedule.alphas_cumprod.double(), mu, s, objective

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.abar[t].reshape(-1, *((1,) * (z.ndim - 1)))
        alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()
        zd = z.double()
        x0 = self.mu + alpha * self.s ** 2 * (zd - alpha * self.mu) / (alpha ** 2 * self.s ** 2 + sigma ** 2)
        eps = (zd - alpha * x0) / sigma
        out = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[self.objective]
        return out.to(z.dtype)


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule("linear", 1000)


def objective_for(schedule, student_steps: int, *, mu=0.3, s=0.5, teacher_objective="eps", clip=False,
                  weighting="snr+1") -> DistillationObjective:
    teacher = IsotropicGaussianOracle(schedule, mu, s, teacher_objective)
    return DistillationObjective(teacher, schedule, student_grid(schedule.timesteps, student_steps),
                                 teacher_objective=teacher_objective, teacher_clip=clip, weighting=weighting)


def z_at(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * 1.3


def abar(schedule, t) -> float:
    return 1.0 if t is None else float(schedule.alphas_cumprod[t])


# ----------------------------------------------------------------------------- the grid

def test_student_grid_is_every_other_timestep_of_the_teacher_grid():
    for T, n in ((1000, 4), (1000, 128), (50, 2), (999, 3), (64, 32)):
        grid = student_grid(T, n)
        teacher = S.spaced_timesteps(T, 2 * n, "trailing")
        assert grid.t == S.spaced_timesteps(T, n, "trailing") and grid.t[0] == T - 1
        # student t -> teacher t' -> student t'' (None: the data), walking the teacher grid in order
        walk = [s for i in range(n) for s in (grid.t[i], grid.t_mid[i])]
        assert walk == teacher and grid.t_next == [*grid.t[1:], None]
    with pytest.raises(ConfigError, match="more than T"):
        student_grid(50, 26)


# ----------------------------------------------------------------------------- the target, exactly

@pytest.mark.parametrize("teacher_objective,clip", [("eps", False), ("v", False), ("eps", True)])
def test_two_step_target_matches_two_explicit_ddim_steps(schedule, teacher_objective, clip):
    """For every student step: two ddim_step calls of the sampler with the oracle teacher give z_t'';
    one DDIM step from z_t with x0 = x~ (and the eps consistent with it) lands exactly there."""
    n = 4
    obj = objective_for(schedule, n, teacher_objective=teacher_objective, clip=clip)
    teacher = Dn.make_denoiser(IsotropicGaussianOracle(schedule, 0.3, 0.5, teacher_objective), schedule,
                              objective=teacher_objective, clip=clip)
    grid = obj.grid
    for i in range(n):
        t, mid, nxt = grid.t[i], grid.t_mid[i], grid.t_next[i]
        z_t = z_at(i)
        eps1, x01 = teacher(z_t, t)
        z_mid = S.ddim_step(z_t, eps1, x01, abar(schedule, t), abar(schedule, mid), 0.0, None)
        eps2, x02 = teacher(z_mid, mid)
        z_next = S.ddim_step(z_mid, eps2, x02, abar(schedule, mid), abar(schedule, nxt), 0.0, None)

        x_tilde = obj.targets(z_t, torch.full((SHAPE[0],), t))
        t_batch = torch.full((SHAPE[0],), t)
        eps_tilde = predict_eps_from_x0(schedule, z_t, t_batch, x_tilde)
        one_step = S.ddim_step(z_t, eps_tilde, x_tilde, abar(schedule, t), abar(schedule, nxt), 0.0, None)
        torch.testing.assert_close(one_step, z_next, atol=2e-5, rtol=1e-5)
        if nxt is None:                    # the last student step: the target is the teacher's x0 at t'
            torch.testing.assert_close(x_tilde, x02, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(z_next, x02)
        else:                              # the paper's closed form, with alpha = sqrt(abar), sigma = sqrt(1 - abar)
            a_t, a_n = math.sqrt(abar(schedule, t)), math.sqrt(abar(schedule, nxt))
            ratio = math.sqrt(1 - abar(schedule, nxt)) / math.sqrt(1 - abar(schedule, t))
            torch.testing.assert_close(x_tilde, (z_next - ratio * z_t) / (a_n - ratio * a_t), atol=1e-5, rtol=1e-5)


def test_targets_handle_mixed_timesteps_in_one_batch(schedule):
    obj = objective_for(schedule, 4)
    z = z_at(9)
    t = torch.tensor([999, 249, 749, 499, 249, 999])
    together = obj.targets(z, t)
    for k in range(len(t)):
        torch.testing.assert_close(together[k:k + 1], obj.targets(z[k:k + 1], t[k:k + 1]))
    with pytest.raises(ConfigError, match="grid"):
        obj.targets(z, torch.full((6,), 500))


@pytest.mark.parametrize("clip", [False, True])
def test_a_perfect_student_samples_in_n_steps_what_the_teacher_samples_in_2n(schedule, clip):
    """A 'student' that outputs the v of the target x~ reproduces, through the real DDIM sampler over its
    own N steps, the teacher's 2N-step DDIM samples: the grids and the last step line up with sampling."""
    n = 4
    obj = objective_for(schedule, n, teacher_objective="eps", clip=clip)

    def perfect_student(z, t):
        x_tilde = obj.targets(z, t)
        eps = predict_eps_from_x0(schedule, z, t, x_tilde)
        a, s = schedule.alphas_cumprod[t].float().sqrt().reshape(-1, 1, 1, 1), \
            (1 - schedule.alphas_cumprod[t].float()).sqrt().reshape(-1, 1, 1, 1)
        return a * eps - s * x_tilde                                   # v

    x_T = z_at(3) / 1.3
    teacher = Dn.make_denoiser(IsotropicGaussianOracle(schedule, 0.3, 0.5, "eps"), schedule, objective="eps", clip=clip)
    student = Dn.make_denoiser(perfect_student, schedule, objective="v", clip=False)
    want = S.sample_ddim(teacher, x_T, schedule, S.spaced_timesteps(1000, 2 * n))
    got = S.sample_ddim(student, x_T, schedule, S.spaced_timesteps(1000, n))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    fewer = S.sample_ddim(teacher, x_T, schedule, S.spaced_timesteps(1000, n))
    assert (fewer - want).abs().max() > 1e-3          # ... which the teacher alone in N steps does not do


# ----------------------------------------------------------------------------- the loss

def test_the_ideal_model_of_point_data_has_zero_loss_and_of_spread_data_does_not(schedule):
    """For data at one point the DDIM step of the exact denoiser is exact, so two steps equal one and the
    ideal v-model has zero distillation loss; for spread data DDIM's discretisation makes it positive."""
    t = torch.tensor([999, 749, 499, 249, 999, 249])
    noise, images = z_at(5) / 1.3, torch.full(SHAPE, 0.8)             # images in [0, 1]: x0 = 0.6
    point = objective_for(schedule, 4, mu=0.6, s=0.0)
    losses = point.losses(IsotropicGaussianOracle(schedule, 0.6, 0.0, "v"), 2 * images - 1, t, noise)
    assert losses.shape == (6,) and float(losses.abs().max()) < 1e-8
    spread = objective_for(schedule, 4, mu=0.6, s=0.5)
    assert float(spread.losses(IsotropicGaussianOracle(schedule, 0.6, 0.5, "v"), 2 * images - 1, t, noise).min()) > 1e-6


def test_snr_plus_one_weighting_is_the_v_mse_and_truncated_snr_is_max_snr_1(schedule):
    t = torch.tensor([999, 749, 499, 249, 499, 249])
    noise, images = z_at(6) / 1.3, torch.rand(SHAPE, generator=torch.Generator().manual_seed(1))
    student = IsotropicGaussianOracle(schedule, -0.2, 0.3, "v")       # any network predicting v
    z = (2 * images - 1) * schedule.alphas_cumprod[t].float().sqrt().reshape(-1, 1, 1, 1) \
        + (1 - schedule.alphas_cumprod[t].float()).sqrt().reshape(-1, 1, 1, 1) * noise
    for weighting in ("snr+1", "truncated-snr"):
        obj = objective_for(schedule, 4, weighting=weighting)
        x_tilde = obj.targets(z, t)
        abar_t = schedule.alphas_cumprod[t].double().reshape(-1, 1, 1, 1)
        a, s = abar_t.sqrt(), (1 - abar_t).sqrt()
        v_tilde = a * predict_eps_from_x0(schedule, z, t, x_tilde).double() - s * x_tilde.double()
        v_pred = student(z, t).double()
        x_pred = a * z.double() - s * v_pred
        if weighting == "snr+1":
            want = (v_pred - v_tilde).pow(2).mean(dim=(1, 2, 3))
        else:
            snr = (abar_t / (1 - abar_t)).flatten()
            want = snr.clamp(min=1) * (x_pred - x_tilde.double()).pow(2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(obj.losses(student, 2 * images - 1, t, noise).double(), want, rtol=2e-4, atol=1e-7)
    with pytest.raises(ConfigError, match="weighting"):
        distillation_weight(torch.ones(1), "snr")


# ----------------------------------------------------------------------------- the plan and the config

def test_plan_refuses_counts_that_cannot_be_halved():
    assert DistillConfig("t", rounds=6, teacher_steps=256).student_steps(6) == 4
    with pytest.raises(ConfigError, match="cannot be halved"):
        DistillConfig("t", rounds=3, teacher_steps=12)
    with pytest.raises(ConfigError, match="below 1"):
        DistillConfig("t", rounds=4, teacher_steps=8)
    with pytest.raises(ConfigError, match="positive"):
        DistillConfig("t", rounds=0)


def test_sampling_section_round_trips_and_old_configs_have_none():
    config = RunConfig(preset="digits", model=preset_config("digits"), diffusion=DiffusionConfig(timesteps=50))
    assert "sampling" not in config.to_dict() and RunConfig.from_dict(config.to_dict()).sampling is None
    config.sampling = SamplingOptions(sampler="ddim", steps=4, eta=0.0, clip=False)
    again = RunConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.sampling == config.sampling and again.sampling.steps == 4
    # The section holds the five keys that checkpoints have always held, so either side reads the other's.
    old = {"sampler": "ddim", "steps": 4, "spacing": "trailing", "eta": 0.0, "clip": False}
    assert config.to_dict()["sampling"] == old
    assert RunConfig.from_dict({**config.to_dict(), "sampling": old}).sampling == config.sampling
    with pytest.raises(ConfigError):
        SamplingOptions(sampler="ddpm", eta=0.5)
    for bad in ({"steps": 0}, {"steps": True}, {"steps": 10 ** 6}, {"clip": "yes"}, {"sampler": "ddim", "eta": "0"}):
        with pytest.raises(ConfigError):
            SamplingOptions(**bad)
    with pytest.raises(ConfigError, match="unknown option"):
        RunConfig.from_dict({**config.to_dict(), "sampling": {**old, "stride": 2}})


# ----------------------------------------------------------------------------- ddpm distill, end to end

TINY = ["--steps", "4", "--batch-size", "8", "--timesteps", "50", "--num-images", "4", "--checkpoint-every", "2",
        "--log-every", "2", "--quiet"]
TINY_DISTILL = ["--steps-per-round", "4", "--batch-size", "8", "--num-images", "4", "--checkpoint-every", "2",
                "--log-every", "2", "--keep-last", "0", "--quiet"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddpm", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=300)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    assert main(["train", *TINY, "--out", str(run_dir)]) == 0
    return run_dir


@pytest.fixture(scope="module")
def distilled(teacher, tmp_path_factory) -> Path:
    """Two rounds from 8 teacher steps, through the CLI in a subprocess: 8 -> 4 -> 2."""
    out = tmp_path_factory.mktemp("distill") / "run"
    proc = run_cli("distill", "--checkpoint", str(teacher), "--rounds", "2", "--teacher-steps", "8",
                   *TINY_DISTILL, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_each_round_is_an_ordinary_run_that_records_half_its_teachers_steps(teacher, distilled):
    assert os.readlink(distilled / "student") == "round-02"
    for r, (teacher_steps, steps) in enumerate(((8, 4), (4, 2)), start=1):
        round_dir = distilled / f"round-{r:02d}"
        assert {"config.json", "metrics.jsonl", "samples.png", "checkpoints", "round.json"} <= {
            p.name for p in round_dir.iterdir()}
        meta = read_metadata(round_dir)
        assert meta["step"] == 4
        config = RunConfig.from_dict(meta["config"])
        assert config.sampling == SamplingOptions(sampler="ddim", steps=steps, spacing="trailing", eta=0.0, clip=False)
        assert config.diffusion.objective == "v" and config.diffusion.timesteps == 50
        info = json.loads((round_dir / "round.json").read_text())
        assert (info["teacher_steps"], info["student_steps"]) == (teacher_steps, steps)
        rows = [json.loads(line) for line in (round_dir / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == [2, 4] and all(np.isfinite(row["loss"]) for row in rows)
    # round 2 was initialised from round 1's final EMA weights
    assert json.loads((distilled / "round-02" / "round.json").read_text())["teacher"].endswith("step-0000004.safetensors")


def test_sample_uses_the_students_steps_without_flags(distilled, tmp_path):
    out = tmp_path / "s"
    proc = run_cli("sample", "--checkpoint", str(distilled / "student"), "--num-images", "3", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "record.json").read_text())
    assert (record["sampler"], record["steps"], record["eta"], record["clip"]) == ("ddim", 2, 0.0, False)
    # the same images as asking for it explicitly, from the library
    diffusion, _ = load_diffusion(distilled / "student")
    with np.load(out / "samples.npz") as f:
        np.testing.assert_array_equal(f["images"], generate(diffusion, 3, seed=0, progress=False, sampler="ddim",
                                                            steps=2, eta=0.0, clip=False))
    # ... and as the library's default, which ddpm eval and the training grids use
    with np.load(out / "samples.npz") as f:
        np.testing.assert_array_equal(f["images"], generate(diffusion, 3, seed=0, progress=False))
    # explicit flags still win
    assert main(["sample", "--checkpoint", str(distilled / "student"), "--num-images", "2", "--sampler", "ddpm", "--steps",
                 "3", "--out", str(tmp_path / "t"), "--quiet"]) == 0
    record = json.loads((tmp_path / "t" / "record.json").read_text())
    assert (record["sampler"], record["steps"]) == ("ddpm", 3)


def test_inspect_shows_the_sampling_defaults(distilled, capsys):
    assert main(["inspect", str(distilled / "student")]) == 0
    assert "sampling:   ddim, 2 steps" in capsys.readouterr().out


def test_resume_mid_round_is_bit_identical(teacher, distilled, tmp_path):
    """A run stopped after round 2's step-2 checkpoint, resumed, ends with the same weights."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(distilled, copy, symlinks=True)
    (copy / "round-02" / "checkpoints" / "step-0000004.safetensors").unlink()
    (copy / "round-02" / "samples.png").unlink()
    os.remove(copy / "student")
    os.symlink("round-01", copy / "student")
    assert main(["distill", "--resume", str(copy), "--quiet"]) == 0
    assert os.readlink(copy / "student") == "round-02"
    want, _ = load_checkpoint(distilled / "round-02")
    got, meta = load_checkpoint(copy / "round-02")
    assert meta["step"] == 4 and want.keys() == got.keys()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    rows = [json.loads(line)["step"] for line in (copy / "round-02" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [2, 4]


def one_line_error(capsys, argv: list[str], code: int) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddpm: error:"), err
    return err[0]


def test_refusals(teacher, distilled, tmp_path, capsys):
    out = ["--out", str(tmp_path / "x")]
    assert "no such checkpoint" in one_line_error(capsys, ["distill", "--checkpoint", str(tmp_path / "none"),
                                                           "--rounds", "1", *out], 4)
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint at all")
    assert "not a ddpm checkpoint" in one_line_error(capsys, ["distill", "--checkpoint", str(tmp_path / "bad.safetensors"),
                                                              "--rounds", "1", *out], 4)
    assert "cannot be halved" in one_line_error(capsys, ["distill", "--checkpoint", str(teacher), "--rounds", "2",
                                                         "--teacher-steps", "6", *out], 2)
    assert "below 1" in one_line_error(capsys, ["distill", "--checkpoint", str(teacher), "--rounds", "4",
                                                "--teacher-steps", "8", *out], 2)
    assert "more than the teacher's T = 50" in one_line_error(
        capsys, ["distill", "--checkpoint", str(teacher), "--rounds", "1", "--teacher-steps", "64", *out], 2)
    assert "distilled student of 2" in one_line_error(
        capsys, ["distill", "--checkpoint", str(distilled / "student"), "--rounds", "1", "--teacher-steps", "8", *out], 2)
    assert "--lr" in one_line_error(capsys, ["distill", "--resume", str(distilled), "--lr", "1e-4"], 2)
    assert "not a distillation run" in one_line_error(capsys, ["distill", "--resume", str(teacher)], 2)
    assert "--rounds" in one_line_error(capsys, ["distill", "--checkpoint", str(teacher), *out], 2)
    assert "ddpm distill --resume" in one_line_error(capsys, ["train", "--resume", str(distilled / "round-01"),
                                                              "--steps", "8"], 2)
    assert not (tmp_path / "x").exists()            # nothing was created by a refused command


def test_a_distilled_student_can_be_distilled_further(distilled, tmp_path):
    """Its own step count is the default teacher steps: 2 -> 1."""
    out = tmp_path / "more"
    assert main(["distill", "--checkpoint", str(distilled / "student"), "--rounds", "1", *TINY_DISTILL,
                 "--out", str(out)]) == 0
    assert RunConfig.from_dict(read_metadata(out / "student")["config"]).sampling.steps == 1


def test_an_interrupted_round_names_the_distill_resume_command(teacher, tmp_path, capsys, monkeypatch):
    """A signal stops train() with its own hint (ddpm train --resume ROUND); distill names its own command."""
    import ddpm.train
    from ddpm.errors import TrainingInterrupted

    def stopped(config, run_dir, **kwargs):
        raise TrainingInterrupted(f"SIGTERM received: stopped after step 2 and saved X; continue with: "
                                  f"ddpm train --resume {run_dir}", 143)

    monkeypatch.setattr(ddpm.train, "train", stopped)
    out = tmp_path / "run"
    assert main(["distill", "--checkpoint", str(teacher), "--rounds", "1", "--teacher-steps", "4", *TINY_DISTILL,
                 "--out", str(out)]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ddpm: SIGTERM received: stopped after step 2 and saved X; continue with: ddpm distill --resume {out}"]


def test_dry_run_prints_the_plan_and_writes_nothing(teacher, tmp_path, capsys):
    out = tmp_path / "dry"
    assert main(["distill", "--checkpoint", str(teacher), "--rounds", "2", "--lr", "3e-4", "--dry-run",
                 "--out", str(out)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["distill"]["teacher_steps"] == 32          # T = 50: the largest power of two up to T
    assert plan["train"]["lr"] == 3e-4 and plan["train"]["steps"] == 1000 and plan["data"]["name"] == "digits"
    assert not out.exists()


def test_a_class_conditional_teacher_distils_into_a_conditional_student(tmp_path):
    teacher_dir, out = tmp_path / "cond", tmp_path / "d"
    assert main(["train", *TINY, "--conditional", "--out", str(teacher_dir)]) == 0
    assert main(["distill", "--checkpoint", str(teacher_dir), "--rounds", "1", "--teacher-steps", "4", *TINY_DISTILL,
                 "--out", str(out)]) == 0
    config = RunConfig.from_dict(read_metadata(out / "student")["config"])
    assert config.model.num_classes == 10 and config.sampling.steps == 2
    diffusion, _ = load_diffusion(out / "student")
    images = generate(diffusion, 2, progress=False, labels=[3, 5], guidance_scale=2.0)
    assert images.shape == (2, 8, 8, 1)


@pytest.mark.parametrize("variant", [{"variance": "learned-range", "loss": "hybrid"}, {"self_condition": True}])
def test_a_teacher_with_learned_variances_or_self_conditioning_is_refused(variant):
    import dataclasses

    from ddpm.config import RunConfig
    from ddpm.distill import DistillConfig, check_teacher
    from ddpm.errors import ConfigError

    teacher = RunConfig.for_preset("digits")
    teacher = dataclasses.replace(teacher, diffusion=dataclasses.replace(teacher.diffusion, **variant))
    with pytest.raises(ConfigError, match="fixed variances and without self-conditioning"):
        check_teacher(teacher, DistillConfig(teacher="t.safetensors", rounds=1, teacher_steps=8))


def test_a_teachers_time_limit_does_not_carry_over_to_its_students(tmp_path, capsys):
    teacher_dir = tmp_path / "teacher"
    assert main(["train", *TINY, "--time-limit", "30", "--out", str(teacher_dir)]) == 0
    capsys.readouterr()
    assert main(["distill", "--checkpoint", str(teacher_dir), "--rounds", "1", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["time_limit"] == 0.0
