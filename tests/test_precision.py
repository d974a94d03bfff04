"""The fast paths: channels-last weights (sampling and training) and reduced-precision autocast."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.cli import main
from ddpm.errors import ConfigError
from ddpm.generate import generate, load_diffusion
from ddpm.precision import autocast, channels_last, check_precision
from ddpm.train import _match_parameter_layout

from test_cli_sample import one_line_error


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("precision") / "run"
    assert main(["train", "--steps", "3", "--batch-size", "8", "--timesteps", "50", "--num-samples", "2",
                 "--quiet", "--out", str(run)]) == 0
    return run


def conv_weights(diffusion) -> list[torch.Tensor]:
    return [m.weight for m in diffusion.model.modules() if isinstance(m, torch.nn.Conv2d)]


def test_sampling_weights_are_channels_last_on_the_cpu_and_give_the_same_images(run_dir):
    fast, _ = load_diffusion(run_dir)
    plain, _ = load_diffusion(run_dir, channels_last=False)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(fast))
    assert not all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(plain))
    options = dict(sampler="ddim", steps=5, progress=False, seed=1)
    a, b = generate(fast, 6, batch_size=6, **options), generate(plain, 6, batch_size=6, **options)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    # Batch-size invariance (image k depends on (seed, k) alone) holds in the channels-last format too.
    np.testing.assert_array_equal(generate(fast, 6, batch_size=4, **options), a)


def test_bf16_runs_the_network_in_bfloat16_and_the_maths_in_float32(run_dir):
    fp32, _ = load_diffusion(run_dir)
    bf16, _ = load_diffusion(run_dir, precision="bf16")
    seen = []
    bf16.model.conv_out.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    steps: list[torch.dtype] = []
    options = dict(sampler="ddim", steps=5, progress=False, seed=2)
    low = generate(bf16, 4, batch_size=4, callback=lambda idx, info: steps.append(info["x_t"].dtype), **options)
    assert seen and set(seen) == {torch.bfloat16}
    assert steps and set(steps) == {torch.float32}
    full = generate(fp32, 4, batch_size=4, **options)
    # bfloat16 keeps 8 significant bits: the images agree to a few of 255 levels, not bit for bit.
    diff = np.abs(low.astype(int) - full.astype(int))
    assert diff.mean() < 2.0 and diff.max() <= 24


def test_sample_precision_flag_is_recorded(run_dir, tmp_path):
    out = tmp_path / "s"
    assert main(["sample", "--checkpoint", str(run_dir), "--out", str(out), "--quiet", "--n", "2",
                 "--precision", "bf16", "--steps", "3"]) == 0
    assert json.loads((out / "record.json").read_text())["precision"] == "bf16"
    assert main(["sample", "--checkpoint", str(run_dir), "--out", str(tmp_path / "f"), "--quiet", "--n", "1"]) == 0
    assert json.loads((tmp_path / "f" / "record.json").read_text())["precision"] == "fp32"


@pytest.mark.parametrize("command", [["sample"], ["eval", "--metric", "fast", "--data", "digits"]])
def test_fp16_on_the_cpu_is_one_clear_error(run_dir, tmp_path, capsys, command):
    out = ["--out", str(tmp_path / ("x" if command[0] == "sample" else "x.json"))]
    line = one_line_error(capsys, [*command, "--checkpoint", str(run_dir), *out, "--quiet",
                                   "--precision", "fp16", "--device", "cpu"])
    assert "fp16 needs a CUDA device" in line
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.json").exists()


def test_autocast_and_its_checks():
    cpu = torch.device("cpu")
    with autocast(cpu, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(cpu, "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    check_precision(cpu, "bf16")
    for bad in ("fp16", "int8"):
        with pytest.raises(ConfigError):
            check_precision(cpu, bad)


def test_where_the_weights_go_channels_last():
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert channels_last(cpu, "fp32", training=True) and channels_last(cpu, "fp32", training=False)
    assert not channels_last(cpu, "bf16", training=True)       # measured slower (benchmarks/RESULTS.md)
    assert channels_last(cpu, "bf16", training=False)
    assert channels_last(cuda, "fp16", training=True)
    assert not channels_last(mps, "fp32", training=False)


@pytest.mark.parametrize("fused", [True, False])
def test_restored_adam_moments_take_their_parameters_layout(fused):
    """A checkpoint stores contiguous moments; the fused step needs them laid out like the
    channels-last parameters, or it pairs the wrong elements and the run silently diverges."""
    torch.manual_seed(0)
    w0, grads = torch.randn(8, 4, 3, 3), [torch.randn(8, 4, 3, 3) for _ in range(3)]

    def steps(channels_last: bool, restore_after: int | None) -> torch.Tensor:
        layout = torch.channels_last if channels_last else torch.contiguous_format
        p = torch.nn.Parameter(w0.clone().contiguous(memory_format=layout))
        opt = torch.optim.Adam([p], lr=0.1, fused=fused)
        for i, g in enumerate(grads):
            if i == restore_after:      # what resume does: a fresh optimizer, contiguous moments from disk
                saved = opt.state_dict()
                saved["state"] = {k: {n: v.contiguous() for n, v in st.items()} for k, st in saved["state"].items()}
                opt = torch.optim.Adam([p], lr=0.1, fused=fused)
                opt.load_state_dict(saved)
                _match_parameter_layout(opt)
                assert all(v.stride() == p.stride() for v in opt.state[p].values() if v.shape == p.shape)
            p.grad = g.clone().contiguous(memory_format=layout)
            opt.step()
        return p.detach().contiguous()

    reference = steps(False, None)
    torch.testing.assert_close(steps(True, None), reference)
    torch.testing.assert_close(steps(True, 2), reference)
