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
from ddpm.training_state import match_parameter_layout

from test_cli_sample import one_line_error


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("precision") / "run"
    assert main(["train", "--steps", "3", "--batch-size", "8", "--timesteps", "50", "--num-images", "2",
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
    assert main(["sample", "--checkpoint", str(run_dir), "--out", str(out), "--quiet", "--num-images", "2",
                 "--precision", "bf16", "--steps", "3"]) == 0
    assert json.loads((out / "record.json").read_text())["precision"] == "bf16"
    assert main(["sample", "--checkpoint", str(run_dir), "--out", str(tmp_path / "f"), "--quiet", "--num-images", "1"]) == 0
    assert json.loads((tmp_path / "f" / "record.json").read_text())["precision"] == "fp32"


@pytest.mark.parametrize("command", [["sample"], ["eval", "--metric", "fast", "--data", "digits"]])
def test_fp16_on_the_cpu_is_one_clear_error(run_dir, tmp_path, capsys, command):
    out = ["--out", str(tmp_path / ("x" if command[0] == "sample" else "x.json"))]
    line = one_line_error(capsys, [*command, "--checkpoint", str(run_dir), *out, "--quiet",
                                   "--precision", "fp16", "--device", "cpu"])
    assert "fp16 needs a CUDA device" in line
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_train_refuses_fp16_on_the_cpu_before_the_run_directory_exists(tmp_path, capsys, monkeypatch, how):
    out = tmp_path / "run"
    if how == "flag":
        argv = ["train", "--steps", "2", "--out", str(out), "--precision", "fp16", "--device", "cpu"]
    else:
        monkeypatch.setenv("DDPM_PRECISION", "fp16")
        argv = ["train", "--steps", "2", "--out", str(out), "--device", "cpu"]
    assert "fp16 needs a CUDA device" in one_line_error(capsys, argv)
    assert not out.exists()


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
                match_parameter_layout(opt)
                assert all(v.stride() == p.stride() for v in opt.state[p].values() if v.shape == p.shape)
            p.grad = g.clone().contiguous(memory_format=layout)
            opt.step()
        return p.detach().contiguous()

    reference = steps(False, None)
    torch.testing.assert_close(steps(True, None), reference)
    torch.testing.assert_close(steps(True, 2), reference)


# ----------------------------------------------------------------------------- --precision auto

import ddpm.precision as precision_module  # noqa: E402
import ddpm.train  # noqa: E402
import ddpm.train_eval  # noqa: E402
from ddpm.precision import BF16_MIN_SPEEDUP, cache_path, cpu_verdict, machine_key, probe_cpu, resolve_precision  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture
def probed(monkeypatch, tmp_path):
    """No DDPM_PRECISION, a fresh cache folder, oneDNN's bf16 kernels present, and a probe whose
    timing the test sets (``probed.speedup``); ``probed.calls`` counts the probes run."""
    monkeypatch.delenv("DDPM_PRECISION", raising=False)
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision_module, "_cpu_has_bf16", lambda: True)

    class Probe:
        speedup, calls = 2.0, 0

        def __call__(self, seconds: float = 0.5) -> dict:
            self.calls += 1
            return {"fp32_s": 0.1 * self.speedup, "bf16_s": 0.1}

    probe = Probe()
    monkeypatch.setattr(precision_module, "probe_cpu", probe)
    return probe


def test_an_explicit_precision_is_kept_whatever_the_environment_says(monkeypatch):
    monkeypatch.setenv("DDPM_PRECISION", "fp32")
    assert resolve_precision("bf16", CPU).precision == "bf16"
    assert resolve_precision("fp32", CPU).precision == "fp32"
    for bad in ("int8", "AUTO"):
        with pytest.raises(ConfigError, match="unknown precision"):
            resolve_precision(bad, CPU)
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        resolve_precision("fp16", CPU)


def test_ddpm_precision_forces_the_automatic_choice(probed, monkeypatch):
    for forced in ("fp32", "bf16"):
        monkeypatch.setenv("DDPM_PRECISION", forced)
        choice = resolve_precision("auto", CPU)
        assert choice.precision == forced and "DDPM_PRECISION" in choice.line()
    assert probed.calls == 0
    for bad, message in (("fp16", "DDPM_PRECISION=fp16 needs a CUDA device"), ("half", "is not a precision")):
        monkeypatch.setenv("DDPM_PRECISION", bad)
        with pytest.raises(ConfigError, match=message):
            resolve_precision("auto", CPU)


def test_auto_on_a_cpu_follows_the_probe_and_caches_its_verdict_per_machine(probed, monkeypatch):
    choice = resolve_precision("auto", CPU)
    assert choice.precision == "bf16" and "2.00x" in choice.line() and probed.calls == 1
    cached = json.loads(cache_path().read_text())
    assert cached[machine_key()]["precision"] == "bf16" and cached[machine_key()]["speedup"] == 2.0
    probed.speedup = 0.5                        # the cache answers: no second probe, the same verdict
    assert resolve_precision("auto", CPU).precision == "bf16" and probed.calls == 1
    # Another torch version (or processor) is another key: probed afresh, cached beside the first.
    monkeypatch.setattr(precision_module, "machine_key", lambda: "another machine | avx2 | torch 0.0")
    assert resolve_precision("auto", CPU).precision == "fp32" and probed.calls == 2
    assert len(json.loads(cache_path().read_text())) == 2


def test_the_machine_key_tells_apart_processors_that_share_a_model_name(tmp_path):
    """Virtual machines may name two processor generations alike ("AMD EPYC"): family and model decide."""
    def cpuinfo(family: int, model: int) -> str:
        path = tmp_path / f"cpuinfo-{family}-{model}"
        processor = (f"processor\t: {{}}\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: {model}\n"
                     "model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n")
        path.write_text(processor.format(0) + processor.format(1))
        return str(path)

    zen4, zen5 = machine_key(cpuinfo(25, 17)), machine_key(cpuinfo(26, 2))
    assert zen4 != zen5 and zen4 == machine_key(cpuinfo(25, 17))
    assert zen4.startswith("AMD EPYC (family 25, model 17) | avx2 avx512f avx512_bf16 | torch ")


def test_bf16_must_beat_fp32_by_a_margin_and_needs_onednn_kernels(probed, monkeypatch, tmp_path):
    probed.speedup = BF16_MIN_SPEEDUP * 0.98
    assert cpu_verdict(cache_dir=tmp_path / "a")["precision"] == "fp32"
    probed.speedup = BF16_MIN_SPEEDUP * 1.02
    assert cpu_verdict(cache_dir=tmp_path / "b")["precision"] == "bf16"
    monkeypatch.setattr(precision_module, "_cpu_has_bf16", lambda: False)
    assert cpu_verdict(cache_dir=tmp_path / "c")["precision"] == "fp32" and probed.calls == 2


def test_an_unreadable_cache_is_probed_again_and_an_unwritable_one_is_not_fatal(probed, tmp_path):
    path = cache_path()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert resolve_precision("auto", CPU).precision == "bf16" and probed.calls == 1
    assert machine_key() in json.loads(path.read_text())
    blocker = tmp_path / "file"
    blocker.write_text("")                       # a cache "folder" that is a file: nothing can be written
    assert cpu_verdict(cache_dir=blocker / "sub")["precision"] == "bf16"


def test_auto_on_cuda_is_bf16_where_the_gpu_has_it_and_fp32_on_other_devices(monkeypatch):
    monkeypatch.delenv("DDPM_PRECISION", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(precision_module, "_cuda_bf16", lambda device, native=native: native)
        assert resolve_precision("auto", torch.device("cuda")).precision == expected
    assert resolve_precision("auto", torch.device("mps")).precision == "fp32"


def test_the_probe_times_both_precisions():
    timing = probe_cpu(seconds=0.0)             # three passes of each; the figures are not judged here
    assert set(timing) == {"fp32_s", "bf16_s"} and all(v > 0 for v in timing.values())


def autocast_spy(monkeypatch) -> list[str]:
    """Records the precision of every autocast the training loop enters."""
    seen: list[str] = []

    def spy(device, precision):
        seen.append(precision)
        return autocast(device, precision)

    monkeypatch.setattr(ddpm.train, "autocast", spy)
    return seen


def test_train_auto_runs_records_and_resumes_with_the_probed_precision(probed, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(ddpm.train_eval, "generate", lambda d, n, **kw: np.zeros((n, *d.image_size, d.channels), np.uint8))
    seen = autocast_spy(monkeypatch)
    run = tmp_path / "run"
    tiny = ["--batch-size", "8", "--timesteps", "50", "--num-images", "2", "--checkpoint-every", "0"]
    assert main(["train", "--steps", "2", *tiny, "--out", str(run)]) == 0
    err = capsys.readouterr().err
    assert err.count("precision: bf16 (auto: bf16 ran 2.00x") == 1
    assert set(seen) == {"bf16"}
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["precision"] == "bf16"
    # Resumed: the recorded bf16, though the automatic choice would now be fp32.
    monkeypatch.setenv("DDPM_PRECISION", "fp32")
    seen.clear()
    assert main(["train", "--resume", str(run), "--steps", "3", "--quiet"]) == 0
    assert set(seen) == {"bf16"} and json.loads((run / "config.json").read_text())["train"]["precision"] == "bf16"
    # Told otherwise: the resumed run switches, and records it.
    seen.clear()
    assert main(["train", "--resume", str(run), "--steps", "4", "--quiet", "--precision", "fp32"]) == 0
    assert set(seen) == {"fp32"} and json.loads((run / "config.json").read_text())["train"]["precision"] == "fp32"


def test_python_training_defaults_to_auto(probed, monkeypatch, tmp_path):
    from ddpm.config import DiffusionConfig, RunConfig, TrainConfig
    from ddpm.data import ImageData
    from ddpm.models import preset_config
    from ddpm.train import train

    assert TrainConfig().precision == "auto"
    monkeypatch.setattr(ddpm.train_eval, "generate", lambda d, n, **kw: np.zeros((n, *d.image_size, d.channels), np.uint8))
    seen = autocast_spy(monkeypatch)
    config = RunConfig(preset="digits", model=preset_config("digits"), diffusion=DiffusionConfig(timesteps=50),
                       train=TrainConfig(steps=1, batch_size=8, num_samples=2, checkpoint_every=0))
    images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
    train(config, tmp_path / "run", data=ImageData(images, None, "tiny"), progress=False)
    assert seen == ["bf16"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["precision"] == "bf16"


def test_sample_auto_records_the_resolved_precision_and_says_it_once(run_dir, probed, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", "--checkpoint", str(run_dir), "--out", str(out), "--num-images", "1", "--steps", "2"]) == 0
    assert json.loads((out / "record.json").read_text())["precision"] == "bf16"
    assert capsys.readouterr().err.count("precision: bf16 (auto") == 1
    # A bad option after the precision is resolved is still one line, the error alone.
    line = one_line_error(capsys, ["sample", "--checkpoint", str(run_dir), "--out", str(tmp_path / "x"),
                                   "--class", "3"])
    assert "class-conditional" in line


def test_distill_defaults_to_auto_resolved_once_into_its_plan(run_dir, probed, monkeypatch, tmp_path):
    """The teacher trained in fp32; its students take auto (here bf16), recorded in the plan."""
    from ddpm.distill import PLAN_FILE
    from ddpm.errors import TrainingInterrupted

    seen = []

    def stopped(config, round_dir, **kwargs):
        seen.append(config.train.precision)
        raise TrainingInterrupted("stopped", 143)

    monkeypatch.setattr(ddpm.train, "train", stopped)
    out = tmp_path / "distilled"
    assert main(["distill", "--checkpoint", str(run_dir), "--rounds", "1", "--steps-per-round", "2",
                 "--batch-size", "8", "--quiet", "--out", str(out)]) == 143
    assert json.loads((run_dir / "config.json").read_text())["train"]["precision"] == "fp32"
    assert json.loads((out / PLAN_FILE).read_text())["train"]["precision"] == "bf16" and seen == ["bf16"]
