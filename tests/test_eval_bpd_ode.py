"""``ddpm eval --metric bpd-ode``: the exact NLL through the probability-flow ODE, beside the bound, on
tiny models; its options reach ``ddpm.evaluation.ode_likelihood.bpd_ode`` and bad ones are one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.cli import main
from ddpm.data import load_dataset
from ddpm.denoiser import make_denoiser
from ddpm.edm import EDMDenoiser
from ddpm.evaluation import ode_likelihood
from ddpm.evaluation.likelihood import images_to_x0
from ddpm.evaluation.reference import subset_indices
from ddpm.generate import load_diffusion
from ddpm.sigmas import DiscreteSigmaDenoiser

TINY = ["--dim", "8", "--num-res-blocks", "1", "--steps", "1", "--batch-size", "4", "--num-images", "1", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ode")
    assert main(["train", *TINY, "--timesteps", "30", "--out", str(root / "ddpm")]) == 0
    assert main(["train", *TINY, "--formulation", "edm", "--out", str(root / "edm")]) == 0
    return {"ddpm": root / "ddpm", "edm": root / "edm"}


def evaluate(run: Path, out: Path, *flags: str) -> dict:
    assert main(["eval", "--checkpoint", str(run), "--data", "digits", "--num-images", "2", "--quiet",
                 "--out", str(out), *flags]) == 0
    return json.loads(out.read_text())


def test_beside_the_bound_and_as_the_library_computes_it(runs, tmp_path):
    results = evaluate(runs["ddpm"], tmp_path / "r.json", "--metric", "bpd", "--metric", "bpd-ode",
                       "--ode-solver", "heun", "--ode-steps", "2", "--probes", "2", "--seed", "4")
    assert {"bpd", "bpd_stderr", "bpd_ode", "bpd_ode_stderr"} <= set(results)
    assert (results["bpd_ode_probes"], results["bpd_ode_solver"], results["bpd_ode_steps"],
            results["bpd_ode_nfe"]) == (2, "heun", 2, 4)            # heun: 2 evaluations a step
    diffusion = load_diffusion(runs["ddpm"])[0]
    assert diffusion.clip_denoised                                 # the checkpoint clips; the likelihood must not
    test = load_dataset("digits", split="test")
    x0 = images_to_x0(test.images[subset_indices(test.num_images, 2)])
    D = DiscreteSigmaDenoiser(make_denoiser(diffusion.model, diffusion.schedule, clip=False), diffusion.schedule)
    expected = ode_likelihood.bpd_ode(D, x0, generator=torch.Generator().manual_seed(4), probes=2, solver="heun",
                                      steps=2)
    assert results["bpd_ode"] == pytest.approx(expected.bpd, rel=1e-6)
    assert results["bpd_ode_stderr"] == pytest.approx(expected.stderr, rel=1e-5)


def test_an_edm_checkpoint_uses_edms_denoiser(runs, tmp_path, monkeypatch):
    seen = []
    real = ode_likelihood.bpd_ode
    monkeypatch.setattr(ode_likelihood, "bpd_ode", lambda D, x0, **k: seen.append((D, k)) or real(D, x0, **k))
    results = evaluate(runs["edm"], tmp_path / "e.json", "--metric", "bpd-ode", "--ode-solver", "rk4",
                       "--ode-steps", "1")
    (D, options), = seen
    assert isinstance(D, EDMDenoiser) and options["solver"] == "rk4" and options["probes"] == 1
    assert not torch.is_inference_mode_enabled() and np.isfinite(results["bpd_ode"])


def test_bad_options_are_one_line(runs, tmp_path, capsys):
    base = ["eval", "--checkpoint", str(runs["ddpm"]), "--data", "digits", "--metric", "bpd-ode"]
    for flags, word in ((["--probes", "0"], "--probes"), (["--probes", "65"], "--probes"),
                        (["--ode-steps", "4"], "--ode-steps"), (["--ode-solver", "euler"], "--ode-solver")):
        try:
            code = main([*base, *flags])
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and word in err[0], (flags, err)
    assert main(["eval", "--samples", str(tmp_path), "--data", "digits", "--metric", "bpd-ode"]) == 2
    assert "needs --checkpoint" in capsys.readouterr().err
