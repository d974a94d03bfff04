"""One vocabulary across the commands: ``--num-images`` (older spellings as hidden, deprecated aliases),
``--checkpoint`` wherever a checkpoint is read, ``--out`` said to be a directory or a file, and one rule
for the sampler's default step count (:func:`ddpm.generate.resolve_sampling`), recorded in record.json.

The checkpoints here are built, not trained (random weights, T = 100, so that "all T", 50 and 20
steps differ), and the samplers are replaced by a spy that records the timesteps it is given and
returns x_T at once: what is under test is which sampler runs over which steps, not the images.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch

from ddpm import samplers as samplers_module
from ddpm.checkpoint import save_checkpoint
from ddpm.cli import main
from ddpm.cli.parser import build_parser
from ddpm.config import DiffusionConfig, RunConfig
from ddpm.errors import ConfigError
from ddpm.generate import SAMPLER_DEFAULT_STEPS, resolve_sampling
from ddpm.models import Unet, UnetConfig
from ddpm.resolve import load_toml
from ddpm.samplers import DEFAULT_SAMPLING, SamplingOptions

T = 100
TINY = dict(image_size=8, channels=1, dim=8, dim_mults=(1,), num_res_blocks=1, attention_resolutions=(),
            dropout=0.0, norm_groups=4)


def make_checkpoint(path: Path, sampling: SamplingOptions | None = None) -> Path:
    """A tiny checkpoint with T = 100, and ``sampling`` as its own sampler section (None: none)."""
    config = RunConfig(preset="custom", model=UnetConfig(**TINY), diffusion=DiffusionConfig(timesteps=T),
                       sampling=sampling)
    state = Unet(config.model).state_dict()
    tensors = {**{f"model.{k}": v for k, v in state.items()}, **{f"ema.{k}": v.clone() for k, v in state.items()}}
    return save_checkpoint(path, tensors, {"step": 1, "config": config.to_dict()})


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("vocab") / "plain.safetensors")


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """A checkpoint whose own sampling section asks for DDIM over 4 steps, as a distilled student's does."""
    return make_checkpoint(tmp_path_factory.mktemp("vocab") / "student.safetensors",
                           SamplingOptions(sampler="ddim", steps=4, spacing="trailing", eta=0.0, clip=False))


@pytest.fixture
def spy(monkeypatch) -> list[tuple[str, list[int]]]:
    """Every sampler call as (sampler name, timesteps); the sampler returns x_T (clamped) at once."""
    calls: list[tuple[str, list[int]]] = []
    for name in list(samplers_module.SAMPLERS):
        def fake(denoiser, x, schedule, timesteps, *, name=name, callback=None, **kwargs):
            calls.append((name, [int(t) for t in timesteps]))
            x = x.clamp(-1, 1)
            for i, t in enumerate(timesteps):                          # what a progressive figure records
                if callback is not None:
                    callback({"i": i, "t": int(t), "x_t": x, "x0_pred": x, "x": x})
            return x
        monkeypatch.setitem(samplers_module.SAMPLERS, name, fake)
    return calls


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


# ----------------------------------------------------------------------------- --num-images and its aliases

# (command line before the count, the new spelling, the old one, the destination it sets)
ALIASES = [
    (["sample", "--checkpoint", "c"], "--num-images", "--n", "n"),
    (["eval", "--checkpoint", "c"], "--num-images", "--n", "n"),
    (["interpolate", "--checkpoint", "c", "--image-a", "a", "--image-b", "b"], "--num-images", "--n-interp",
     "n_interp"),
    (["viz", "forward", "--data", "digits", "--out", "f.png"], "--num-images", "--n", "n"),
    (["viz", "reverse", "--checkpoint", "c", "--out", "r.png"], "--num-images", "--n", "n"),
    (["inpaint", "--checkpoint", "c", "--image", "digits:0", "--mask", "center"], "--num-images", "--n", "n"),
    (["edit", "--checkpoint", "c", "--image", "digits:0", "--strength", "0.5"], "--num-images", "--n", "n"),
    (["train"], "--num-images", "--num-samples", "num_samples"),
    (["train"], "--eval-num-images", "--eval-samples", "eval_samples"),
    (["distill", "--checkpoint", "c"], "--num-images", "--num-samples", "num_samples"),
]


@pytest.mark.parametrize("prefix, new, old, dest", ALIASES, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_each_old_spelling_sets_what_the_new_one_sets_with_one_note(capsys, prefix, new, old, dest):
    assert getattr(parse(*prefix, new, "7"), dest) == 7
    assert capsys.readouterr().err == ""                             # the new spelling: no note
    assert getattr(parse(*prefix, old, "7"), dest) == 7
    assert capsys.readouterr().err.splitlines() == [f"ddpm: note: {old} is deprecated; use {new}"]
    for bad in ("0", "x"):                                           # the same validation as before
        with pytest.raises(SystemExit) as exc:
            parse(*prefix, old, bad)
        assert exc.value.code == 2
        assert "expected a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("prefix, new, old, dest", ALIASES, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_old_spellings_are_absent_from_help(capsys, prefix, new, old, dest):
    command = prefix[:2] if prefix[0] == "viz" else prefix[:1]
    with pytest.raises(SystemExit):
        parse(*command, "--help")
    text = capsys.readouterr().out
    assert re.search(rf"(?<![\w-]){new}(?![\w-])", text)
    assert not re.search(rf"(?<![\w-]){old}(?![\w-])", text)


def test_the_note_is_printed_by_rank_0_only(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert parse("sample", "--checkpoint", "c", "--n", "3").n == 3
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    parse("sample", "--checkpoint", "c", "--n", "3")
    assert capsys.readouterr().err.count("deprecated") == 1


def test_an_old_spelling_runs_end_to_end_with_one_note_line(plain, tmp_path, spy, capsys):
    assert main(["sample", "--checkpoint", str(plain), "--n", "3", "--out", str(tmp_path / "s"), "--quiet"]) == 0
    record = json.loads((tmp_path / "s" / "record.json").read_text())
    assert record["n"] == 3
    assert [line for line in capsys.readouterr().err.splitlines() if "ddpm:" in line] == [
        "ddpm: note: --n is deprecated; use --num-images"]


def test_the_toml_keys_of_the_image_counts_take_both_spellings(tmp_path):
    new, old, both = tmp_path / "new.toml", tmp_path / "old.toml", tmp_path / "both.toml"
    new.write_text("[train]\nnum_images = 9\neval_num_images = 12\n")
    old.write_text("[train]\nnum_samples = 9\neval_samples = 12\n")
    both.write_text("[train]\nnum_samples = 9\nnum_images = 9\n")
    assert load_toml(new)["train"] == load_toml(old)["train"] == {"num_samples": 9, "eval_samples": 12}
    with pytest.raises(ConfigError, match="both num_samples and num_images"):
        load_toml(both)


def test_messages_name_the_counts_by_their_new_spelling():
    from ddpm.cli.cmd_train import TRAIN_FLAGS
    from ddpm.cli.common import FLAG_SPELLINGS, flag as _flag     # e.g. resume's "cannot change --num-images"

    assert {_flag(name) for name in TRAIN_FLAGS} >= {"--num-images", "--eval-num-images"}
    assert not {"--num-samples", "--eval-samples"} & {_flag(name) for name in TRAIN_FLAGS}
    assert set(FLAG_SPELLINGS) <= set(TRAIN_FLAGS)


def test_the_parsers_choices_are_the_librarys_names():
    """The parser repeats the library's names (presets, schedules, samplers, ...) so that --help imports no
    torch; each must equal its source, in its order."""
    import importlib

    from ddpm.cli import choices

    for name, module in choices.SOURCES.items():
        source = getattr(importlib.import_module(module), name)
        assert getattr(choices, name) == (source if isinstance(source, float) else tuple(source)), name


# ----------------------------------------------------------------------------- --checkpoint everywhere

def test_inspect_takes_the_checkpoint_either_way(plain, capsys):
    assert main(["inspect", str(plain), "--json"]) == 0
    positional = capsys.readouterr().out
    assert main(["inspect", "--checkpoint", str(plain), "--json"]) == 0
    assert capsys.readouterr().out == positional and json.loads(positional)["step"] == 1


def test_viz_training_and_import_take_the_checkpoint_either_way(monkeypatch, tmp_path, capsys):
    import ddpm.cli.cmd_io as interop
    import ddpm.viz as viz

    seen = []
    monkeypatch.setattr(viz, "training_figure", lambda out, run_dir, grids: seen.append(("viz", str(run_dir))))
    monkeypatch.setattr(viz, "training_to_tensorboard", lambda *a, **k: False)
    monkeypatch.setattr(interop, "import_diffusers", lambda folder, out: seen.append(("import", str(folder))) or out)
    for form in (["runs/007"], ["--checkpoint", "runs/007"]):
        assert main(["viz", "training", *form, "--out", str(tmp_path / "t.png")]) == 0
        assert main(["import", *form, "--out", str(tmp_path / "c.safetensors")]) == 0
    assert seen == [("viz", "runs/007"), ("import", "runs/007")] * 2


@pytest.mark.parametrize("argv", [["inspect"], ["viz", "training", "--out", "t.png"], ["import", "--out", "c.st"]],
                         ids=lambda v: " ".join(v[:2]))
def test_the_checkpoint_both_ways_or_neither_is_a_usage_error(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for extra, words in (([], "give the"), (["runs/1", "--checkpoint", "runs/1"], "not both")):
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ddpm: error:") and words in err[0], err
    assert not list(tmp_path.iterdir())                                # nothing written


# ----------------------------------------------------------------------------- --out: a directory or a file

OUT_KINDS = {"train": "directory", "sample": "directory", "interpolate": "directory", "export": "directory",
             "distill": "directory", "prepare": "directory", "inpaint": "directory", "edit": "directory",
             "invert": "directory", "eval": "file", "import": "file", "ema": "file", "viz schedule": "file",
             "viz forward": "file", "viz reverse": "file", "viz training": "file"}


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every command's parser by its name ('viz reverse' for the viz subcommands)."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                inner = _actions(sub)
                found.update({f"{name} {k}": v for k, v in inner.items()} if inner else {name: sub})
    return found


def test_every_out_says_whether_it_is_a_directory_or_a_file():
    commands = _actions(build_parser())
    with_out = {name for name, p in commands.items() if any("--out" in a.option_strings for a in p._actions)}
    assert with_out == set(OUT_KINDS)
    for name, kind in OUT_KINDS.items():
        out = next(a for a in commands[name]._actions if "--out" in a.option_strings)
        assert out.help.startswith(f"a {kind}"), (name, out.help)
        assert out.metavar.endswith("DIR" if kind == "directory" else "FILE"), (name, out.metavar)


# ----------------------------------------------------------------------------- default step counts

def test_the_rule_in_the_library():
    assert SAMPLER_DEFAULT_STEPS == {"ddpm": None, "ddim": 50, "dpm-solver++": 20, "euler": 50, "heun": 18,
                                     "euler-ancestral": 50, "dpm-solver++-sde": 25}
    student = SamplingOptions(sampler="ddim", steps=4, eta=0.0, clip=False)
    table = [  # (sampler, steps, base) -> (sampler, steps over T = 100, sampler_from, steps_from)
        ((None, None, None), ("ddpm", 50, "default", "default")),
        (("ddpm", None, None), ("ddpm", 100, "flag", "default")),
        (("ddim", None, None), ("ddim", 50, "flag", "default")),
        (("dpm-solver++", None, None), ("dpm-solver++", 20, "flag", "default")),
        (("heun", None, None), ("heun", 18, "flag", "default")),
        (("euler", None, None), ("euler", 50, "flag", "default")),
        (("euler-ancestral", None, None), ("euler-ancestral", 50, "flag", "default")),
        (("dpm-solver++-sde", None, None), ("dpm-solver++-sde", 25, "flag", "default")),
        ((None, None, student), ("ddim", 4, "checkpoint", "checkpoint")),
        (("ddim", None, student), ("ddim", 4, "flag", "checkpoint")),
        (("dpm-solver++", None, student), ("dpm-solver++", 20, "flag", "default")),
        (("ddim", 7, student), ("ddim", 7, "flag", "flag")),
        ((None, 7, student), ("ddim", 7, "checkpoint", "flag")),
        (("ddpm", 7, None), ("ddpm", 7, "flag", "flag")),
    ]
    for (sampler, steps, base), (name, count, sampler_from, steps_from) in table:
        options, sources = resolve_sampling(sampler, steps, base=base)
        got = (options.sampler, len(options.timesteps(T)), sources["sampler_from"], sources["steps_from"])
        assert got == (name, count, sampler_from, steps_from), (sampler, steps, base)
    assert resolve_sampling()[0] == DEFAULT_SAMPLING
    assert resolve_sampling("ddim", base=student)[0].clip is False      # the checkpoint's section as a whole
    # capped at T: a short schedule runs all of its steps, but an explicit count over T is an error
    assert len(resolve_sampling("dpm-solver++")[0].timesteps(12)) == 12
    with pytest.raises(ConfigError):
        resolve_sampling(steps=30)[0].timesteps(12)


STEP_TABLE = [  # (checkpoint, flags) -> (sampler, steps, sampler_from, steps_from)
    ("plain", [], ("ddpm", 50, "default", "default")),
    ("plain", ["--sampler", "ddpm"], ("ddpm", T, "flag", "default")),
    ("plain", ["--sampler", "ddim"], ("ddim", 50, "flag", "default")),
    ("plain", ["--sampler", "dpm-solver++"], ("dpm-solver++", 20, "flag", "default")),
    ("plain", ["--sampler", "ddim", "--steps", "7"], ("ddim", 7, "flag", "flag")),
    ("student", [], ("ddim", 4, "checkpoint", "checkpoint")),
    ("student", ["--sampler", "ddim"], ("ddim", 4, "flag", "checkpoint")),
    ("student", ["--sampler", "ddpm"], ("ddpm", T, "flag", "default")),
    ("student", ["--steps", "9"], ("ddim", 9, "checkpoint", "flag")),
    ("student", ["--sampler", "dpm-solver++", "--steps", "3"], ("dpm-solver++", 3, "flag", "flag")),
]


@pytest.mark.parametrize("which, flags, expected", STEP_TABLE, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_sample_follows_the_step_rule_and_records_it(request, tmp_path, spy, which, flags, expected):
    checkpoint = request.getfixturevalue(which)
    out = tmp_path / "s"
    assert main(["sample", "--checkpoint", str(checkpoint), "--num-images", "1", "--out", str(out), "--quiet",
                 *flags]) == 0
    sampler, steps, sampler_from, steps_from = expected
    assert [(name, len(ts)) for name, ts in spy] == [(sampler, steps)]
    record = json.loads((out / "record.json").read_text())
    assert (record["sampler"], record["steps"], record["sampler_from"], record["steps_from"]) == expected


@pytest.mark.parametrize("command", ["interpolate", "edit", "inpaint", "viz reverse"])
def test_the_other_sampling_commands_follow_the_same_rule(command, student, plain, tmp_path, spy):
    """The checkpoint's own section without flags, and a sampler named alone at its default count."""
    def run(checkpoint, *flags):
        out = tmp_path / f"o{len(spy)}"
        argv = {"interpolate": ["interpolate", "--image-a", "digits:0", "--image-b", "digits:1", "--t", f"{T - 1}",
                                "--num-images", "2", "--out", str(out)],
                "edit": ["edit", "--image", "digits:0", "--strength", "1", "--out", str(out)],
                "inpaint": ["inpaint", "--image", "digits:0", "--mask", "center", "--out", str(out)],
                "viz reverse": ["viz", "reverse", "--num-images", "1", "--frames", "2",
                                "--out", str(out) + ".png"]}[command]
        spy.clear()
        code = main([*argv, "--checkpoint", str(checkpoint), *flags])
        record = json.loads((out / "record.json").read_text()) if out.is_dir() else None
        return code, sorted({(name, len(ts)) for name, ts in spy}), record

    if command == "viz reverse":
        pytest.importorskip("matplotlib")
    code, calls, record = run(student)
    assert code == 0 and calls == [("ddim", 4)]
    if record is not None:
        assert (record["sampler_from"], record["steps_from"]) == ("checkpoint", "checkpoint")
    code, calls, record = run(plain, "--sampler", "dpm-solver++")
    assert code == 0 and calls == [("dpm-solver++", 20)]
    if record is not None:
        assert (record["sampler"], record["sampler_from"], record["steps_from"]) == ("dpm-solver++", "flag",
                                                                                   "default")


def test_eval_samples_by_the_same_rule(student, plain, spy, tmp_path):
    """``ddpm eval --checkpoint`` end to end with ``--sampler ddim`` alone (50 steps, not all T), and the
    library's :func:`~ddpm.generate.generate`, through which eval samples, for the rest of the table."""
    from ddpm.generate import generate, load_diffusion

    results = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(plain), "--data", "digits", "--metric", "fast", "--num-images", "2",
                 "--sampler", "ddim", "--quiet", "--cache-dir", str(tmp_path), "--out", str(results)]) == 0
    assert [(name, len(ts)) for name, ts in spy] == [("ddim", 50)]
    assert json.loads(results.read_text())["sampling"] == {"sampler": "ddim", "steps": 50, "sampler_from": "flag",
                                                          "steps_from": "default"}
    for checkpoint, sampler, expected in ((student, None, ("ddim", 4)), (plain, "dpm-solver++", ("dpm-solver++", 20)),
                                          (plain, None, ("ddpm", 50)), (plain, "ddpm", ("ddpm", T))):
        spy.clear()
        generate(load_diffusion(checkpoint)[0], 1, sampler=sampler, progress=False)
        assert [(name, len(ts)) for name, ts in spy] == [expected]


def test_help_texts_describe_the_rule(capsys):
    for command in (["sample"], ["eval"], ["interpolate"], ["edit"], ["viz", "reverse"]):
        with pytest.raises(SystemExit):
            parse(*command, "--help")
        text = " ".join(capsys.readouterr().out.split())
        assert "20 for dpm-solver++" in text and "50 for ddim" in text, command
        assert "else all T" not in text
    with pytest.raises(SystemExit):
        parse("sample", "--help")
    for line in capsys.readouterr().out.splitlines():                 # the examples: "all T" only for ddpm alone
        if "all T steps" in line and line.lstrip().startswith("ddpm sample"):
            assert "--sampler ddpm" in line, line
