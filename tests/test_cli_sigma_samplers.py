"""The sigma samplers' options on the command line: ``--churn``, ``--s-tmin``, ``--s-tmax``, ``--s-noise``,
``--rho`` and ``--spacing karras`` reach :class:`~ddpm.samplers.SamplingOptions` (and so the sampler) and
record.json, in ``sample``, ``edit``, ``viz reverse`` and ``eval``; bad values are one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ddpm import samplers
from ddpm.cli import main
from ddpm.evaluation.pipeline import EvalConfig, _sampling
from ddpm.generate import load_diffusion


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("sigma") / "run"
    assert main(["train", "--steps", "1", "--batch-size", "4", "--timesteps", "30", "--num-images", "1",
                 "--quiet", "--out", str(run)]) == 0
    return run


@pytest.fixture
def spy(monkeypatch):
    """The keyword options and the levels each sampler call receives."""
    calls = []
    for name, fn in list(samplers.SAMPLERS.items()):
        def wrapped(*args, _fn=fn, _name=name, **kwargs):
            calls.append((_name, args[3], {k: v for k, v in kwargs.items() if k not in ("noise", "callback")}))
            return _fn(*args, **kwargs)
        monkeypatch.setitem(samplers.SAMPLERS, name, wrapped)
    return calls


def one_line_error(capsys, argv: list[str]) -> str:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "error:" in err[0] and "Traceback" not in err[0], (code, err)
    return err[0]


EDM_FLAGS = ["--sampler", "heun", "--steps", "3", "--spacing", "karras", "--rho", "3", "--churn", "2",
             "--s-tmin", "0.1", "--s-tmax", "50", "--s-noise", "1.003"]


def test_sample_passes_the_options_to_the_sampler_and_records_them(run_dir, tmp_path, spy):
    out = tmp_path / "s"
    assert main(["sample", "--checkpoint", str(run_dir), "--num-images", "2", "--quiet", "--out", str(out),
                 *EDM_FLAGS]) == 0
    (name, levels, kwargs), = spy
    assert name == "heun" and kwargs == {"churn": 2.0, "s_tmin": 0.1, "s_tmax": 50.0, "s_noise": 1.003}
    diffusion = load_diffusion(run_dir)[0]
    sigmas = samplers.schedule_sigmas(diffusion.schedule)
    assert levels == samplers.karras_sigmas(3, float(sigmas[0]), float(sigmas[-1]), 3.0)      # rho reached Eq. 5
    record = json.loads((out / "record.json").read_text())
    assert {k: record[k] for k in ("sampler", "steps", "spacing", "churn", "s_tmin", "s_tmax", "s_noise", "rho")} == {
        "sampler": "heun", "steps": 3, "spacing": "karras", "churn": 2.0, "s_tmin": 0.1, "s_tmax": 50.0,
        "s_noise": 1.003, "rho": 3.0}
    with np.load(out / "samples.npz") as f:
        churned = f["images"]
    assert main(["sample", "--checkpoint", str(run_dir), "--num-images", "2", "--quiet", "--out", str(tmp_path / "d"),
                 *EDM_FLAGS[:6]]) == 0
    with np.load(tmp_path / "d" / "samples.npz") as f:
        assert not np.array_equal(f["images"], churned)                            # the churn changed the images
    assert "churn" not in json.loads((tmp_path / "d" / "record.json").read_text())


def test_bad_values_are_one_line(run_dir, tmp_path, capsys):
    base = ["sample", "--checkpoint", str(run_dir), "--out", str(tmp_path / "e"), "--quiet"]
    for flags, word in ((["--churn", "-1"], "--churn"), (["--s-noise", "nan"], "--s-noise"),
                        (["--rho", "0"], "--rho"), (["--spacing", "kerras"], "--spacing"),
                        (["--sampler", "ddim", "--churn", "1"], "churn only applies"),
                        (["--sampler", "euler", "--rho", "3"], "rho only applies"),
                        (["--sampler", "heun", "--s-tmin", "5", "--s-tmax", "1"], "must not exceed")):
        assert word in one_line_error(capsys, [*base, *flags]), flags
    assert not (tmp_path / "e").exists()


def test_edit_refuses_karras_in_one_line_and_takes_churn(run_dir, tmp_path, capsys, spy):
    base = ["edit", "--checkpoint", str(run_dir), "--image", "digits:3", "--strength", "0.5"]
    assert "karras" in one_line_error(capsys, [*base, "--out", str(tmp_path / "k"), "--sampler", "euler",
                                               "--spacing", "karras"])
    assert "karras" in one_line_error(capsys, ["interpolate", "--checkpoint", str(run_dir), "--image-a", "digits:0",
                                               "--image-b", "digits:1", "--t", "10", "--spacing", "karras",
                                               "--out", str(tmp_path / "i")])
    assert main([*base, "--out", str(tmp_path / "c"), "--sampler", "euler", "--steps", "3", "--churn", "1"]) == 0
    assert [(name, kwargs) for name, _, kwargs in spy] == [("euler", {"churn": 1.0})]
    assert json.loads((tmp_path / "c" / "record.json").read_text())["churn"] == 1.0


def test_viz_reverse_and_eval_take_the_options(run_dir, tmp_path, spy):
    pytest.importorskip("matplotlib")
    assert main(["viz", "reverse", "--checkpoint", str(run_dir), "--num-images", "1", "--frames", "2",
                 "--sampler", "euler-ancestral", "--steps", "2", "--spacing", "karras", "--s-noise", "0.5",
                 "--out", str(tmp_path / "r.png")]) == 0
    (name, levels, kwargs), = spy
    assert name == "euler-ancestral" and kwargs == {"s_noise": 0.5} and isinstance(levels, samplers.Sigmas)
    diffusion = load_diffusion(run_dir)[0]
    config = EvalConfig(checkpoint=str(run_dir), data="digits", metrics=("fast",), sampler="dpm-solver++-sde",
                        spacing="karras", rho=5.0, s_noise=0.9)
    plan, record = _sampling(config, diffusion)
    assert (plan.sampler, plan.steps, plan.sampler_kwargs, plan.options.rho) == ("dpm-solver++-sde", 25,
                                                                                 {"s_noise": 0.9}, 5.0)
