"""Learning-rate schedules, several EMAs and the post-hoc EMA, wired into training, checkpoints and the CLI.

Each feature is observed at its effect: the rate the optimizer steps with (a spy), the averages
computed by hand from the weights after each step, snapshots against EDM2's closed-form profile
weights, and ``ddpm ema``'s rebuilt average against the stored profile it must reproduce. Runs go
through the CLI in-process on the digits preset with T = 30 (sample grids stubbed out).
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from helpers.spies import no_sample_grids, spy_optimizer

from ddpm.build import build_model
from ddpm.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint, split_prefix
from ddpm.cli import main
from ddpm.config import RunConfig
from ddpm.errors import CheckpointError
from ddpm.models import Unet
from ddpm.posthoc_ema import load_snapshot, list_snapshots, sigma_rel_to_gamma

TINY = ["--dim", "8", "--batch-size", "4", "--timesteps", "30", "--num-images", "2", "--log-every", "1", "--keep-last", "0",
        "--device", "cpu", "--precision", "fp32", "--quiet"]


def train(run_dir, *flags: str, resume: bool = False):
    """``ddpm train`` in-process, with spies: the optimizer steps taken."""
    argv = ["train", *TINY, *flags, *(["--resume", str(run_dir)] if resume else ["--out", str(run_dir)])]
    with no_sample_grids(), spy_optimizer() as steps:
        assert main(argv) == 0
    return steps


def drop_last_checkpoint(run_dir, step: int) -> None:
    """Undo the end of a run: its last checkpoint and final grid, so --resume repeats the steps after the one before."""
    checkpoint_path(run_dir, step).unlink()
    (run_dir / "samples.png").unlink()


def one_line_error(capsys, argv, *phrases) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:           # argparse's usage errors
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in err and err.startswith("ddpm"), err
    for phrase in phrases:
        assert phrase in err, err


# ----------------------------------------------------------------------------- learning-rate schedules

LR, LR_MIN, W, S = 1e-3, 1e-4, 2, 6


def expected_lr(name: str, step: int) -> float:
    """The rate of 0-based ``step``, written from the formulas (docs/training.md)."""
    if step < W:
        return LR * (step + 1) / W                                       # linear warm-up
    p = (step - W) / (S - W)
    if name == "cosine":
        return LR_MIN + (LR - LR_MIN) * 0.5 * (1 + math.cos(math.pi * p))   # SGDR Eq. 5
    if name == "linear":
        return LR - (LR - LR_MIN) * p
    return LR / math.sqrt(max(step / 3, 1.0))                           # inverse-sqrt, t_ref = 3


@pytest.mark.parametrize("name", ["cosine", pytest.param("linear", marks=pytest.mark.slow),
                                  pytest.param("inverse-sqrt", marks=pytest.mark.slow)])
def test_each_lr_schedule_reaches_the_optimizer_and_continues_across_a_resume(tmp_path, name):
    flags = ["--steps", str(S), "--checkpoint-every", "3", "--lr", str(LR), "--warmup-steps", str(W),
             "--lr-schedule", name, "--lr-min", str(LR_MIN), "--lr-ref-steps", "3"]
    run = tmp_path / "run"
    whole = train(run, *flags)
    assert [s.lr[0] for s in whole] == pytest.approx([expected_lr(name, k) for k in range(S)], rel=1e-12, abs=0)
    final = load_checkpoint(run)[0]
    drop_last_checkpoint(run, S)
    resumed = train(run, *flags, resume=True)                            # from step 3
    assert [s.lr[0] for s in resumed] == pytest.approx([expected_lr(name, k) for k in range(3, S)], rel=1e-12, abs=0)
    again = load_checkpoint(run)[0]
    assert all(torch.equal(final[k], again[k]) for k in final)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in logged if "lr" in r] == pytest.approx([expected_lr(name, k) for k in range(S)], rel=1e-9)


# ----------------------------------------------------------------------------- several EMAs

DECAYS = (0.9, 0.5)


@pytest.fixture(scope="module")
def two_emas(tmp_path_factory):
    """A run keeping two averages without warm-up, its optimizer steps and its final tensors."""
    run = tmp_path_factory.mktemp("emas") / "run"
    steps = train(run, "--steps", "4", "--checkpoint-every", "2", "--ema-decay", *map(str, DECAYS), "--no-ema-warmup")
    return run, steps, load_checkpoint(run)


def test_each_ema_follows_its_own_decay_and_is_checkpointed_under_its_name(two_emas):
    run, steps, (tensors, meta) = two_emas
    assert meta["ema_decays"] == list(DECAYS)
    names = [n for n, _ in build_model(RunConfig.from_dict(meta["config"])).named_parameters()]   # the optimizer's order
    for prefix, d in (("ema", DECAYS[0]), ("ema@0.5", DECAYS[1])):
        average = [p.double() for p in steps[0].params_before]             # every average starts at the initial weights
        for step in steps:
            average = [d * a + (1 - d) * p.double() for a, p in zip(average, step.params_after)]
        saved = split_prefix(tensors, prefix)
        for name, value in zip(names, average):
            torch.testing.assert_close(saved[name].double(), value, rtol=1e-5, atol=1e-6, msg=f"{prefix}.{name}")
    first, second = split_prefix(tensors, "ema"), split_prefix(tensors, "ema@0.5")
    assert max(float((first[n] - second[n]).abs().max()) for n in names) > 1e-4


def test_several_emas_resume_bit_for_bit(two_emas, tmp_path):
    run, _, (tensors, _) = two_emas
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    drop_last_checkpoint(copy, 4)
    train(copy, "--steps", "4", resume=True)
    again = load_checkpoint(copy)[0]
    assert again.keys() == tensors.keys() and all(torch.equal(tensors[k], again[k]) for k in tensors)


def seen_weights(capsys, argv: list[str]) -> dict[str, torch.Tensor]:
    """Run the command: the weights the network held when it was first called."""
    seen = {}
    original = Unet.forward

    def forward(self, x, t, *args, **kwargs):
        seen.setdefault("weights", {k: v.detach().clone() for k, v in self.state_dict().items()})
        return original(self, x, t, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Unet, "forward", forward)
        assert main(argv) == 0
    capsys.readouterr()
    return seen["weights"]


def sample(capsys, run, out, weights: str) -> dict[str, torch.Tensor]:
    """``ddpm sample --weights WEIGHTS``: the weights the network held when the sampler called it."""
    seen = seen_weights(capsys, ["sample", "--checkpoint", str(run), "--num-images", "2", "--sampler", "ddim",
                                 "--steps", "2", "--device", "cpu", "--quiet", "--weights", weights, "--out", str(out)])
    assert json.loads((out / "record.json").read_text())["weights"] == weights
    return seen


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


def test_weights_ema_d_samples_with_that_decays_average(two_emas, tmp_path, capsys):
    run, _, (tensors, meta) = two_emas
    assert_same(sample(capsys, run, tmp_path / "second", "ema:0.5"), split_prefix(tensors, "ema@0.5"))
    assert_same(sample(capsys, run, tmp_path / "first", "ema:0.9"), split_prefix(tensors, "ema"))
    assert_same(sample(capsys, run, tmp_path / "default", "ema"), split_prefix(tensors, "ema"))
    assert_same(sample(capsys, run, tmp_path / "raw", "raw"), split_prefix(tensors, "model"))
    one_line_error(capsys, ["sample", "--checkpoint", str(run), "--weights", "ema:0.7", "--out", str(tmp_path / "x")],
                   "no EMA weights for decay 0.7", "0.9, 0.5")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", [
    ["interpolate", "--image-a", "digits:0", "--image-b", "digits:1", "--num-images", "3", "--t", "2"],
    ["viz", "reverse", "--num-images", "1", "--frames", "2", "--steps", "2", "--sampler", "ddim"],
    ["edit", "--image", "digits:0", "--strength", "0.1", "--steps", "2", "--sampler", "ddim"],
])
def test_weights_ema_d_reaches_the_other_sampling_commands(two_emas, tmp_path, capsys, command):
    run, _, (tensors, _) = two_emas
    out = tmp_path / ("reverse.png" if command[0] == "viz" else "out")
    argv = [*command, "--checkpoint", str(run), "--device", "cpu", "--weights", "ema:0.5", "--out", str(out)]
    assert_same(seen_weights(capsys, argv), split_prefix(tensors, "ema@0.5"))


@pytest.mark.parametrize("argv, phrase", [
    (["train", "--ema-decay", "1.5"], "EMA decay in [0, 1]"),
    (["train", "--ema-decay", "-0.1"], "EMA decay in [0, 1]"),
    (["train", "--ema-decay", "0.9", "0.9", "--steps", "1"], "each EMA decay may be given once"),
    (["sample", "--checkpoint", "x", "--weights", "ema:2"], "expected raw, ema or ema:DECAY"),
    (["train", "--lr-schedule", "cosine", "--steps", "3", "--warmup-steps", "3"], "needs --steps (3) above"),
])
def test_bad_decays_and_schedules_are_one_line_errors(capsys, tmp_path, argv, phrase):
    one_line_error(capsys, [*argv, "--out", str(tmp_path / "run")], phrase)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- post-hoc EMA

PROFILES = (0.05, 0.10)


@pytest.fixture(scope="module")
def snapshotted(tmp_path_factory):
    """A run of 6 steps snapshotting every 2 (checkpoints at 3 and 6), and its optimizer steps."""
    run = tmp_path_factory.mktemp("phema") / "run"
    steps = train(run, "--steps", "6", "--checkpoint-every", "3", "--ema-snapshot-every", "2")
    return run, steps


def profile_average(steps, gamma: float, t: int) -> list[torch.Tensor]:
    """sum_tau w_tau theta_tau, w_tau = (tau / t)^(gamma + 1) - ((tau - 1) / t)^(gamma + 1) (EDM2 Eqs. 121, 127)."""
    out = None
    for tau in range(1, t + 1):
        w = (tau / t) ** (gamma + 1) - ((tau - 1) / t) ** (gamma + 1)
        theta = [p.double() for p in steps[tau - 1].params_after]
        out = [w * p for p in theta] if out is None else [o + w * p for o, p in zip(out, theta)]
    return out


def test_snapshots_hold_the_power_function_averages_and_a_resume_rewrites_the_lost_ones(snapshotted, tmp_path):
    run, steps = snapshotted
    assert [s for s, _ in list_snapshots(run)] == [2, 4, 6]
    meta = load_checkpoint(run)[1]
    assert meta["ema_profiles"] == list(PROFILES)
    names = [n for n, _ in build_model(RunConfig.from_dict(meta["config"])).named_parameters()]
    for t in (2, 4, 6):
        profiles, info = load_snapshot(list_snapshots(run)[t // 2 - 1][1])
        for i, sigma_rel in enumerate(PROFILES):
            expected = profile_average(steps, sigma_rel_to_gamma(sigma_rel), t)
            for name, value in zip(names, expected):
                torch.testing.assert_close(profiles[i][name].double(), value, rtol=1e-5, atol=1e-6, msg=f"{t} {name}")
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    originals = {s: p.read_bytes() for s, p in list_snapshots(run)}
    drop_last_checkpoint(copy, 6)
    (copy / "ema-snapshots" / "step-0000004.safetensors").write_bytes(b"stale")   # after the checkpoint of step 3
    train(copy, "--steps", "4", resume=True)               # from 3 to 4: the snapshot of step 6 belongs to no state now
    assert [s for s, _ in list_snapshots(copy)] == [2, 4]
    drop_last_checkpoint(copy, 4)
    train(copy, "--steps", "6", resume=True)               # from 3 again, to 6: the same snapshots as the whole run
    for s, p in list_snapshots(copy):
        a, b = load_snapshot(p)[0], load_snapshot(list_snapshots(run)[s // 2 - 1][1])[0]
        assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x), s
    assert sorted(originals) == [s for s, _ in list_snapshots(copy)]


def test_ddpm_ema_rebuilds_a_stored_profile_and_writes_a_checkpoint(snapshotted, tmp_path, capsys):
    run, _ = snapshotted
    out = tmp_path / "ema-0.05.safetensors"
    assert main(["ema", "--checkpoint", str(run), "--sigma-rel", "0.05", "--step", "4", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "relative error of the fit 0.00%" in said and "(2 snapshots)" in said, said
    profiles, _ = load_snapshot(list_snapshots(run)[1][1])                 # step 4, profile 0 (sigma_rel 0.05)
    rebuilt, meta = load_checkpoint(out)
    assert meta["step"] == 4 and meta["posthoc_ema"]["sigma_rel"] == 0.05
    for name, value in profiles[0].items():
        torch.testing.assert_close(rebuilt[f"ema.{name}"], value, rtol=1e-5, atol=1e-6)
    assert_same(sample(capsys, out, tmp_path / "samples", "ema"), split_prefix(rebuilt, "ema"))   # an ordinary checkpoint


def test_ddpm_ema_errors_are_one_line_and_write_nothing(snapshotted, two_emas, tmp_path, capsys):
    run, _ = snapshotted
    base = ["ema", "--checkpoint", str(run)]
    one_line_error(capsys, [*base, "--sigma-rel", "0.25", "--out", str(tmp_path / "a.safetensors")],
                   "beyond the reach of the stored profiles")
    one_line_error(capsys, [*base, "--sigma-rel", "0.05", "--out", str(run / "checkpoints" / "b.safetensors")],
                   "inside", "checkpoints")
    one_line_error(capsys, ["ema", "--checkpoint", str(two_emas[0]), "--sigma-rel", "0.05",
                            "--out", str(tmp_path / "c.safetensors")], "no post-hoc EMA snapshots")
    one_line_error(capsys, [*base, "--sigma-rel", "0.3", "--out", str(tmp_path / "d.safetensors")], "sigma_rel in (0, 0.2887)")
    existing = tmp_path / "e.safetensors"
    existing.write_bytes(b"keep")
    one_line_error(capsys, [*base, "--sigma-rel", "0.05", "--out", str(existing)], str(existing))
    assert existing.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.safetensors"]
    assert not (run / "checkpoints" / "b.safetensors").exists()


def test_ddpm_ema_sweep_scores_each_length_and_writes_a_table_and_a_plot(snapshotted, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    run, _ = snapshotted
    assert main(["ema", "--checkpoint", str(run), "--sweep", "--sigma-rels", "0.05", "0.08", "0.1",
                 "--num-images", "16", "--device", "cpu", "--sweep-dir", str(tmp_path / "sweep")]) == 0
    said = capsys.readouterr().out
    result = json.loads((tmp_path / "sweep" / "ema-sweep.json").read_text())
    assert result["metric"] == "fast_fid" and result["step"] == 6
    assert [r["sigma_rel"] for r in result["rows"]] == [0.05, 0.08, 0.1]
    assert all(math.isfinite(r["fast_fid"]) for r in result["rows"])
    assert "best: sigma_rel" in said and said.count("%") >= 3
    assert (tmp_path / "sweep" / "ema-sweep.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- checkpoints and run directories

def resave(tmp_path, tensors, meta, name="edited.safetensors"):
    path = tmp_path / name
    save_checkpoint(path, {k: v.clone() for k, v in tensors.items()},
                    {k: v for k, v in meta.items() if k not in ("path", "sha256", "format_version")})
    return path


def test_the_checkpoint_checks_know_the_decays_the_profiles_and_their_finiteness(two_emas, snapshotted, tmp_path):
    _, _, (tensors, meta) = two_emas
    for edit, phrase in (({"ema_decays": [0.9, 0.7]}, "ema_decays"), ({"ema_decays": [0.9, 1.5]}, "ema_decays"),
                         ({"ema_profiles": [0.05]}, None)):
        path = resave(tmp_path, tensors, {**meta, **edit})
        if phrase is None:
            load_checkpoint(path)                   # profiles listed without phema.* tensors are accepted
            continue
        with pytest.raises(CheckpointError, match=phrase):
            load_checkpoint(path)
    poisoned = dict(tensors)
    name = next(k for k in tensors if k.startswith("ema@0.5."))
    poisoned[name] = torch.full_like(tensors[name], float("nan"))
    with pytest.raises(CheckpointError, match="non-finite"):
        load_checkpoint(resave(tmp_path, poisoned, meta, "nan.safetensors"))
    ph_tensors, ph_meta = load_checkpoint(snapshotted[0])
    with pytest.raises(CheckpointError, match="ema_profiles"):
        load_checkpoint(resave(tmp_path, ph_tensors, {k: v for k, v in ph_meta.items() if k != "ema_profiles"}))
    with pytest.raises(CheckpointError, match="ema_profiles"):
        load_checkpoint(resave(tmp_path, ph_tensors, {**ph_meta, "ema_profiles": [0.05]}))


def test_a_run_stopped_before_its_first_checkpoint_starts_again_without_its_old_snapshots(tmp_path):
    run = tmp_path / "run"
    (run / "ema-snapshots").mkdir(parents=True)
    stale = run / "ema-snapshots" / "step-0000004.safetensors"
    stale.write_bytes(b"from the run that stopped")
    train(run, "--steps", "2", "--checkpoint-every", "2", "--ema-snapshot-every", "1")
    assert [s for s, _ in list_snapshots(run)] == [1, 2]
