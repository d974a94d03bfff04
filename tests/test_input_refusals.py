"""Inputs that used to pass quietly: non-finite float images, an empty ``--out``, TOML values that an
option overrides; and the bounds on work (image counts, sampling evaluations, a run of over a day)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from ddpm.cli import main
from ddpm.cli.parser import build_parser
from ddpm.data.image_files import load_image_file
from ddpm.errors import ConfigError, DataError, OutputError
from ddpm.fileio import check_output_path
from ddpm.sample_job import check_evaluations, load_image


def _run(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------- non-finite float images

@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_float_image_with_a_non_finite_pixel_is_refused_by_the_editor_and_the_loader(tmp_path, value):
    pixels = np.full((8, 8), 100.0, np.float32)
    pixels[1, 2] = value
    path = tmp_path / "x.tiff"
    Image.fromarray(pixels, mode="F").save(path)
    with pytest.raises(DataError, match="1 non-finite pixel"):
        load_image(str(path), (8, 8), 1)                     # edit, inpaint, invert, interpolate
    with pytest.raises(DataError, match="1 non-finite pixel"):
        load_image_file(path, None)                          # folders for train, prepare, eval, viz


def test_a_finite_float_image_and_a_16_bit_one_read_the_same_in_the_editor_and_the_loader(tmp_path):
    Image.fromarray(np.full((8, 8), 99.6, np.float32), mode="F").save(tmp_path / "f.tiff")
    Image.fromarray(np.full((8, 8), 128 * 257, np.uint16)).save(tmp_path / "i16.png")     # mode I;16
    for name, level in (("f.tiff", 100), ("i16.png", 128)):
        edited = load_image(str(tmp_path / name), (8, 8), 1)
        loaded = np.asarray(load_image_file(tmp_path / name, None))
        assert (loaded == level).all(), name
        assert np.allclose(edited.numpy(), level / 255.0 * 2 - 1) or np.allclose(edited.numpy(), level / 255.0)


# ----------------------------------------------------------------------------- an empty --out

def _commands_with_out(parser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands_with_out(sub, (*path, name))
        elif "--out" in action.option_strings:
            yield path


def test_an_empty_out_is_refused_by_every_command_before_anything_runs(capsys):
    commands = sorted(set(_commands_with_out(build_parser())))
    assert len(commands) >= 15 and ("train",) in commands and ("viz", "schedule") in commands
    for command in commands:
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([*command, "--out", ""])
        assert exc.value.code == 2
        assert "--out: an empty path" in capsys.readouterr().err, command
    with pytest.raises(OutputError, match="empty path"):
        check_output_path("")


# ----------------------------------------------------------------------------- TOML values under options

@pytest.mark.parametrize("toml, flags, words", [
    ("[train]\nbatch_size = -8\n", ["--batch-size", "4"], "overridden by --batch-size"),
    ("[train]\nnum_images = 0\n", ["--num-images", "4"], "overridden by --num-images"),
    ("[diffusion]\ntimesteps = 1\n", ["--timesteps", "10"], "overridden by --timesteps"),
    ("[data]\nimage_size = [0, 0]\n", ["--image-size", "8"], "overridden by --image-size"),
])
def test_a_toml_value_that_an_option_overrides_is_checked_all_the_same(tmp_path, toml, flags, words):
    path = tmp_path / "run.toml"
    path.write_text(toml)
    code, _, err = _run(["train", "--config", str(path), *flags, "--dry-run", "--out", str(tmp_path / "o")])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"ddpm: error: {path}: ") and words in err, err
    assert not (tmp_path / "o").exists()


def test_a_valid_toml_value_still_gives_way_to_the_option(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nbatch_size = 16\n[diffusion]\nloss = \"hybrid\"\nvariance = \"learned-range\"\n")
    code, out, err = _run(["train", "--config", str(path), "--batch-size", "4", "--loss", "simple",
                           "--variance", "posterior", "--dry-run", "--quiet"])
    assert code == 0, err
    config = json.loads(out)
    assert config["train"]["batch_size"] == 4 and config["diffusion"]["loss"] == "simple"


# ----------------------------------------------------------------------------- bounded work

@pytest.mark.parametrize("argv, limit", [
    (["sample", "--checkpoint", "x", "--num-images", "1000001"], "1,000,000"),
    (["interpolate", "--checkpoint", "x", "--image-a", "a", "--image-b", "b", "--num-images", "1001"], "1,000"),
    (["eval", "--metric", "fast", "--num-images", "1000001"], "1,000,000"),
    (["edit", "--checkpoint", "x", "--image", "a", "--strength", "0.5", "--num-images", "1001"], "1,000"),
    (["viz", "forward", "--num-images", "257", "--out", "f.png"], "256"),
    (["train", "--num-images", "65537"], "65,536"),
])
def test_image_counts_are_bounded_and_say_so_in_help(capsys, argv, limit):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2 and f"a positive integer up to {limit}" in capsys.readouterr().err
    command = argv[:2] if argv[0] == "viz" else argv[:1]
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--help"])
    assert f"at most {limit}" in " ".join(capsys.readouterr().out.split())


def test_images_times_steps_is_bounded():
    check_evaluations(1_000_000, 1_000)
    with pytest.raises(ConfigError, match="network evaluations"):
        check_evaluations(1_000_000, 1_001)


@pytest.fixture
def timed(monkeypatch):
    """The estimate of seconds per step is 100 s, and the training itself does not run."""
    import ddpm.cli.cmd_train
    import ddpm.estimates

    calls = []
    monkeypatch.setattr(ddpm.estimates, "estimate_seconds_per_step", lambda config, device: calls.append(1) or 100.0)
    monkeypatch.setattr(ddpm.cli.cmd_train, "_train_in", lambda *args, **kwargs: 0)
    return calls


def test_a_run_estimated_at_over_a_day_says_so_before_it_starts(tmp_path, timed):
    code, _, err = _run(["train", "--steps", "2000", "--batch-size", "8", "--quiet", "--out", str(tmp_path / "o")])
    assert code == 0 and timed == [1]
    assert "ddpm: warning: this run is estimated to take about 2 days on cpu (2,000 steps" in err, err
    code, _, err = _run(["train", "--steps", "2000", "--batch-size", "8", "--time-limit", "600", "--quiet",
                         "--out", str(tmp_path / "p")])
    assert code == 0 and "warning" not in err                # the time limit stops it within the day


def test_a_time_limit_that_cuts_a_decay_short_says_so_before_it_starts(tmp_path, timed):
    """100 s a step: 1,000 minutes reach step 600 of 2,000, where the cosine rate is still 79% of its peak."""
    base = ["train", "--steps", "2000", "--batch-size", "4", "--quiet"]       # too few images x steps to time
    code, _, err = _run([*base, "--lr-schedule", "cosine", "--time-limit", "1000", "--out", str(tmp_path / "o")])
    assert code == 0 and timed == [1]
    assert ("ddpm: warning: --time-limit 1000 is estimated to stop this run at about step 600 of 2,000 (about "
            "100 s a step on cpu), with the cosine learning rate still at 79% of its peak: it decays over --steps; "
            "give --steps 600 to decay within the limit\n") in err, err
    code, _, err = _run([*base[:2], "900", *base[3:], "--lr-schedule", "cosine", "--time-limit", "1440",
                         "--out", str(tmp_path / "p")])
    assert code == 0 and "warning" not in err             # step 864 of 900: 0.4% of the peak left, the decay is done
    code, _, err = _run([*base, "--time-limit", "1000", "--out", str(tmp_path / "q")])
    assert code == 0 and "warning" not in err and timed == [1, 1]     # a constant rate: not timed, nothing to say


def test_a_short_run_is_not_timed(tmp_path, timed):
    code, _, err = _run(["train", "--steps", "20", "--batch-size", "8", "--quiet", "--out", str(tmp_path / "o")])
    assert code == 0 and timed == [] and "warning" not in err
