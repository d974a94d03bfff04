"""The README's first hour runs as written, and every link of the documentation resolves.

README.md marks each code block of its journey with an HTML comment on the line before it:
``<!-- journey -->`` runs the block, ``<!-- journey: skip (why) -->`` names why it cannot run here
(torchrun, a GPU, minutes of Inception). The marked blocks run in order in one temporary
directory, as a newcomer would type them: each ``ddpm ...`` line in-process through
:func:`ddpm.cli.main` with its step and image counts made small (:func:`shrink`), each Python
block through ``exec`` with the same made small. A line must exit 0 and leave the files the
README says it writes; a failing line does not stop the others, so one run names every line
that drifted from the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

import ddpm.generate
from ddpm.cli import main

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from photos import make_photo_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

BLOCK = re.compile(r"<!-- journey(?::\s*skip\s*\((?P<why>[^)]*)\))?\s*-->\s*\n```(?P<lang>\w+)\n(?P<body>.*?)\n```",
                   re.S)
SMALL_STEPS, SMALL_COUNT, SMALL_SIZE = "2", "4", "16"
# Commands that run the sampler or the training loop, and so take --steps.
STEPPED = {"train", "sample", "eval", "interpolate", "inpaint", "edit", "invert", "distill", "viz reverse"}


@dataclasses.dataclass
class Block:
    lang: str
    body: str
    skip: str | None


def journey_blocks(text: str) -> list[Block]:
    """The README's marked code blocks, in order."""
    return [Block(m["lang"], m["body"], m["why"]) for m in BLOCK.finditer(text)]


def command_lines(body: str) -> list[str]:
    """The shell lines of a block, comments stripped, continuation lines joined."""
    joined = body.replace("\\\n", " ")
    lines = [shlex.split(line, comments=True) for line in joined.splitlines()]
    return [" ".join(shlex.quote(word) for word in words) for words in lines if words]


def command_name(argv: list[str]) -> str:
    return f"viz {argv[1]}" if argv[0] == "viz" and len(argv) > 1 else argv[0]


def shrink(argv: list[str]) -> list[str]:
    """``argv`` made small: ``--steps N``, ``--num-images N`` and ``--image-size N`` get small values,
    and a command that samples or trains without ``--steps`` gets it."""
    out = list(argv)
    for option, small in (("--steps", SMALL_STEPS), ("--num-images", SMALL_COUNT), ("--image-size", SMALL_SIZE)):
        if option in out:
            out[out.index(option) + 1] = small
    name = command_name(argv)
    samples_here = name != "eval" or "--checkpoint" in argv
    if name in STEPPED and samples_here and "--steps" not in out:
        out += ["--steps", SMALL_STEPS]
    return out


def shrink_python(code: str) -> str:
    """A Python block with its step counts, batch sizes and image size made small."""
    code = re.sub(r"\bimage_size=(\d+)", lambda m: f"image_size={min(int(m[1]), int(SMALL_SIZE))}", code)
    code = re.sub(r"\btrain_num_steps=[\d_]+", f"train_num_steps={SMALL_STEPS}", code)
    code = re.sub(r"\bsampling_timesteps=\d+", f"sampling_timesteps={SMALL_STEPS}", code)
    code = re.sub(r"\b(train_)?batch_size=\d+", rf"\1batch_size={SMALL_COUNT}", code)
    return re.sub(r"\bsteps=\d+", f"steps={SMALL_STEPS}", code)


def _option(argv: list[str], name: str, default=None):
    return argv[argv.index(name) + 1] if name in argv else default


def _next_run_dir() -> Path:
    n = 1
    while Path(f"runs/{n:03d}").exists():
        n += 1
    return Path(f"runs/{n:03d}")


def expected_outputs(argv: list[str]) -> tuple[list[Path], list[Path]]:
    """(files the README says the command writes, paths it must not create), relative to the cwd."""
    name = command_name(argv)
    if name == "train":
        run = Path(_option(argv, "--out") or _next_run_dir())
        if "--dry-run" in argv:
            return [], [run]
        step = f"step-{int(_option(argv, '--steps')):07d}"
        return [run / f for f in ("config.json", "metrics.jsonl", "loss.png", "samples.png",
                                  f"checkpoints/{step}.safetensors", f"samples/{step}.png")], []
    if name == "sample" and "--out" in argv:
        out = Path(_option(argv, "--out"))
        return [out / "grid.png", out / "samples.npz", out / "record.json"], []
    if name.startswith("viz ") or name == "eval":
        return ([Path(_option(argv, "--out"))] if "--out" in argv else []), []
    return [], []


def _check_outputs(argv: list[str], written: list[Path]) -> list[str]:
    """What is wrong with the files a command wrote: their count of images, eval's JSON."""
    problems = []
    name = command_name(argv)
    for path in written:
        if path.suffix == ".npz" and name == "sample":
            n = len(np.load(path)["images"])
            if n != int(SMALL_COUNT):
                problems.append(f"{path} holds {n} images, not the {SMALL_COUNT} asked for")
        if path.suffix == ".json" and name == "eval":
            results = json.loads(path.read_text())
            if not any(key in results for key in ("fast_fid", "fid", "bpd")):
                problems.append(f"{path} holds no metric: {sorted(results)}")
    return problems


def run_line(line: str, capsys) -> str | None:
    """Run one README line; None when it did what the README says, else what went wrong."""
    words = shlex.split(line)
    if words[0] != "ddpm":
        return f"not a ddpm command: {line}"
    argv = shrink(words[1:])
    written, absent = expected_outputs(argv)
    try:
        code = main(argv)
    except SystemExit as exc:                       # argparse: unknown option, bad value
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    if code != 0:
        return f"{line!r} (run as {' '.join(argv)!r}) exited {code}: {err[-1] if err else ''}"
    missing = [str(p) for p in written if not p.is_file()] + [f"{p} (should not exist)" for p in absent if p.exists()]
    if missing:
        return f"{line!r} did not leave {missing}"
    problems = _check_outputs(argv, written)
    return f"{line!r}: {'; '.join(problems)}" if problems else None


def run_python(code: str) -> str | None:
    """Run one README Python block, made small; None when it ran and its results look as it says."""
    namespace: dict = {"__name__": "readme"}
    try:
        exec(compile(shrink_python(code), "README.md", "exec"), namespace)
    except Exception as exc:                        # noqa: BLE001 (report it with the others)
        return f"Python block {code.splitlines()[0]!r}: {type(exc).__name__}: {exc}"
    if "Trainer" in code:
        shape = tuple(namespace["samples"].shape)
        if shape != (int(SMALL_COUNT), 3, int(SMALL_SIZE), int(SMALL_SIZE)) or not list(Path("runs/lucidrains").glob("checkpoints/*")):
            return f"the lucidrains block sampled {shape} and left {list(Path('runs/lucidrains').glob('*'))}"
    if "load_diffusion" in code:
        images = namespace["images"]
        if images.dtype != np.uint8 or images.shape != (64, 8, 8, 1):
            return f"the functional block's generate gave {images.dtype} {images.shape}"
    return None


def test_the_readme_journey_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = journey_blocks(README.read_text())
    assert len(blocks) >= 6 and any(b.skip for b in blocks), "the journey's markers are gone"
    monkeypatch.chdir(tmp_path)
    make_photo_folder(tmp_path / "photos", crops_per_photo=8)
    # The step count of the default sampler, which the training run's sample grids use, made small too.
    monkeypatch.setattr(ddpm.generate, "DEFAULT_SAMPLING",
                        dataclasses.replace(ddpm.generate.DEFAULT_SAMPLING, steps=int(SMALL_STEPS)))
    failures = []
    for block in blocks:
        if block.skip:
            continue
        if block.lang == "bash":
            failures += [f for f in (run_line(line, capsys) for line in command_lines(block.body)) if f]
        elif block.lang == "python":
            failures += [f for f in [run_python(block.body)] if f]
        else:
            failures.append(f"a journey block in {block.lang!r}, neither bash nor python")
    assert not failures, "README lines that no longer do what it says:\n" + "\n".join(failures)


def test_shrink_makes_step_and_image_counts_small():
    assert shrink(["sample", "--checkpoint", "runs/001", "--num-images", "64"]) == \
        ["sample", "--checkpoint", "runs/001", "--num-images", "4", "--steps", "2"]
    assert shrink(["train", "--steps", "20000"]) == ["train", "--steps", "2"]
    assert shrink(["eval", "--samples", "s.npz", "--num-images", "100"]) == ["eval", "--samples", "s.npz",
                                                                             "--num-images", "4"]
    assert shrink(["viz", "schedule", "--out", "s.png"]) == ["viz", "schedule", "--out", "s.png"]
    assert "train_num_steps=2," in shrink_python("Trainer(d, 'p/', train_batch_size=16, train_num_steps=5000,")


def test_a_wrong_readme_line_is_reported(tmp_path, monkeypatch, capsys):
    """The journey check can fail: a misspelt option and a missing output are named."""
    monkeypatch.chdir(tmp_path)
    assert "exited 2" in run_line("ddpm sample --checkpoint runs/001 --num-imagez 4", capsys)
    assert "exited" in run_line("ddpm sample --checkpoint runs/none --out s", capsys)
    assert "not a ddpm command" in run_line("python -m ddpm sample", capsys)


# --- what the README names, and every link -------------------------------------------------------------


def _help_commands(argv: list[str], capsys) -> set[str]:
    with pytest.raises(SystemExit):
        main(argv)
    text = capsys.readouterr().out
    listed = text.split("positional arguments:", 1)[1].split("options:", 1)[0]
    return set(re.findall(r"^ {4}([a-z][\w-]*)", listed, re.M))


def _code_lines(text: str) -> list[str]:
    """The README's shell code: the lines of its bash blocks and its inline code spans."""
    fenced = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()]
    prose = re.sub(r"```\w*\n.*?```", "", text, flags=re.S)
    return [line.strip() for line in fenced + re.findall(r"`([^`\n]+)`", prose)]


def test_every_ddpm_command_the_readme_names_exists(capsys):
    commands = _help_commands(["--help"], capsys)
    viz = _help_commands(["viz", "--help"], capsys)
    assert {"train", "sample", "eval", "viz"} <= commands
    command = re.compile(r"^(?:\.venv/bin/|.*-m )?ddpm ([a-z][\w-]*)(?: ([a-z][\w-]*))?")
    named = [m.groups() for m in map(command.match, _code_lines(README.read_text())) if m]
    assert len(named) >= 10
    unknown = sorted({c for c, _ in named if c not in commands} | {f"viz {w}" for c, w in named if c == "viz"
                                                                    and w not in viz})
    assert not unknown, f"README.md names commands that ddpm --help does not list: {unknown}"


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*]|<[^>]+>", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    seen, anchors = {}, set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = _slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def broken_links(path: Path) -> list[str]:
    """The relative links of a Markdown file whose file, or heading anchor, does not exist."""
    broken = []
    for link in _links(path):
        if re.match(r"[a-z]+:", link):                       # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        if not file.exists():
            broken.append(link)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{link} (no such heading)")
    return broken


def test_the_readme_links_the_reference_pages():
    linked = {Path(link.partition("#")[0]) for link in _links(README) if link.startswith("docs/")}
    pages = {"cli", "training", "samplers", "evaluation", "distributed", "diffusers", "distillation",
             "improved-ddpm", "guide", "data", "editing", "coming-from", "speed", "robustness", "testing",
             "notation", "tensorboard", "hub", "openai", "ema", "continuous-time"}
    assert {Path(f"docs/{p}.md") for p in pages} <= linked
    missing = sorted(str(p) for p in linked if not (ROOT / p).is_file())
    assert not missing, f"README.md links pages that do not exist: {missing}"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_every_relative_link_resolves(path):
    assert not broken_links(path), f"{path.name}: broken links {broken_links(path)}"


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "a.md").write_text("# A page\n\n## Its part\n\n[ok](#its-part) [gone](b.md) [part](a.md#nope)\n")
    assert broken_links(tmp_path / "a.md") == ["b.md", "a.md#nope (no such heading)"]
