"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models", Algorithm 2): a student learns to do two of its teacher's deterministic DDIM
steps in one; it then becomes the teacher of the next round, which halves the step count again.

Discrete time, on the project's timestep spacing: a student of N steps visits the N kept timesteps
``spaced_timesteps(T, N, "trailing")``, which are every other timestep of the teacher's 2N-step grid.
From a student timestep t the teacher steps to the next teacher timestep t' and on to the next
student timestep t'' (or to the data, alpha = 1 and sigma = 0, after the last one). With
alpha_t = sqrt(alpha-bar_t) and sigma_t = sqrt(1 - alpha-bar_t) (``docs/notation.md``):

* z_t = alpha_t x + sigma_t eps, with x a training image;
* z_t' and z_t'' = two DDIM steps of the teacher (Song et al. 2021, Eq. 12 with eta = 0);
* the target x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t),
  the x0 for which ONE DDIM step from t to t'' lands on z_t'' (Algorithm 2); after the last student
  timestep sigma_t'' = 0 and x~ is the teacher's own x0 estimate at t';
* the loss w(lambda_t) || x^_student(z_t) - x~ ||^2 in x-space, with w = 1 + SNR_t ("SNR+1", which
  for a v-predicting student is exactly the MSE of v) or max(SNR_t, 1) ("truncated SNR"), Sec. 4.

The student predicts v (Sec. 4: an eps-predicting network cannot take large steps, since x0 =
(z - sigma eps) / alpha blows up where alpha -> 0). It is initialised from the teacher's EMA weights;
an eps- or x0-predicting teacher therefore also teaches its student the new output in round 1.

Every round is an ordinary run directory written by :func:`ddpm.train.train` (EMA, checkpoints,
resume, metrics, sample grids), whose configuration records the student's step count as its
sampling defaults (``RunConfig.sampling``: DDIM, eta 0, N steps), so ``ddpm sample`` and ``ddpm
eval`` use it without flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from . import distributed, train as training
from .checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint
from .config import DataConfig, RunConfig, TrainConfig, _is_int
from .data import load_dataset
from .denoiser import Denoiser
from .diffusion import offset_noise, q_sample
from .errors import CheckpointError, ConfigError, TrainingInterrupted
from .fileio import write_json
from .generate import load_diffusion
from .losses import Loss
from .precision import resolve_precision
from .samplers import SamplingOptions, ddim_step, spaced_timesteps
from .sampling import x0_clip
from .schedules import NoiseSchedule
from .training_data import load_training_data

__all__ = ["DISTILL_WEIGHTINGS", "STUDENT_OBJECTIVE", "two_step_target", "teacher_two_steps",
           "distillation_weight", "StudentGrid", "student_grid", "DistillationLoss", "DistillationObjective", "DistillConfig",
           "default_teacher_steps", "student_run_config", "new_plan", "resumed_plan", "distill", "DistillResult",
           "PLAN_FILE", "ROUND_FILE"]

DISTILL_WEIGHTINGS = ("snr+1", "truncated-snr")
STUDENT_OBJECTIVE = "v"
PLAN_FILE = "distill.json"          # RUN_DIR/distill.json: the whole plan, read by --resume
ROUND_FILE = "round.json"           # RUN_DIR/round-NN/round.json: what this round distilled from what


# ----------------------------------------------------------------------------- the maths

def _alpha_sigma(alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return alpha_bar.sqrt(), (1.0 - alpha_bar).clamp(min=0.0).sqrt()


def two_step_target(z_t: torch.Tensor, z_next: torch.Tensor, alpha_bar_t: torch.Tensor,
                    alpha_bar_next: torch.Tensor) -> torch.Tensor:
    """x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)  (Algorithm 2).

    The x0 for which a single DDIM step from z_t (eps taken consistent with it, (z_t - alpha_t x0) /
    sigma_t) lands on ``z_next`` at level ``alpha_bar_next``; at the data (alpha-bar 1) it is z_next.
    """
    shape = (-1, *((1,) * (z_t.ndim - 1)))
    alpha_t, sigma_t = _alpha_sigma(alpha_bar_t.reshape(shape))
    alpha_next, sigma_next = _alpha_sigma(alpha_bar_next.reshape(shape))
    ratio = sigma_next / sigma_t
    return (z_next - ratio * z_t) / (alpha_next - ratio * alpha_t)


Predictor = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def teacher_two_steps(predict: Predictor, z_t: torch.Tensor, t: torch.Tensor, t_mid: torch.Tensor,
                      alpha_bar_t: torch.Tensor, alpha_bar_mid: torch.Tensor, alpha_bar_next: torch.Tensor) -> torch.Tensor:
    """z_t'': the teacher's two DDIM steps t -> t' -> t'' (Song et al. 2021, Eq. 12, eta = 0, per sample);
    ``predict(z, t) -> (eps_pred, x0_pred)``. Level alpha-bar = 1 is the data: the step lands on x0_pred."""
    eps_pred, x0_pred = predict(z_t, t)
    z_mid = ddim_step(z_t, eps_pred, x0_pred, alpha_bar_t, alpha_bar_mid)
    eps_pred, x0_pred = predict(z_mid, t_mid)
    return ddim_step(z_mid, eps_pred, x0_pred, alpha_bar_mid, alpha_bar_next)


def distillation_weight(alpha_bar_t: torch.Tensor, weighting: str = "snr+1") -> torch.Tensor:
    """The x-space loss weight (Salimans & Ho 2022, Sec. 4): 1 + SNR_t ("snr+1"; with a v-predicting
    student, (1 + SNR) ||x^ - x~||^2 = ||v^ - v~||^2) or max(SNR_t, 1) ("truncated-snr")."""
    snr = alpha_bar_t / (1.0 - alpha_bar_t)
    if weighting == "snr+1":
        return 1.0 + snr
    if weighting == "truncated-snr":
        return snr.clamp(min=1.0)
    raise ConfigError(f"unknown distillation weighting {weighting!r}; choose from {', '.join(DISTILL_WEIGHTINGS)}")


@dataclass(frozen=True)
class StudentGrid:
    """A student's N timesteps on its teacher's 2N-step grid (0-based, descending).

    Step i of the student goes from ``t[i]`` to ``t_next[i]`` (None: the data); the teacher passes
    through ``t_mid[i]`` on the way.
    """

    t: list[int]
    t_mid: list[int]
    t_next: list[int | None]


def student_grid(timesteps: int, student_steps: int) -> StudentGrid:
    """The trailing N-step grid and the teacher's 2N-step grid that contains it (T >= 2N)."""
    if not _is_int(student_steps) or student_steps < 1 or 2 * student_steps > timesteps:
        raise ConfigError(f"a student of {student_steps} steps needs a teacher of {2 * student_steps} steps, "
                          f"more than T = {timesteps}; use fewer --teacher-steps")
    teacher = spaced_timesteps(timesteps, 2 * student_steps, "trailing")
    student = spaced_timesteps(timesteps, student_steps, "trailing")
    if teacher[0::2] != student:        # cannot happen with trailing spacing; checked, never assumed
        raise ConfigError(f"the {student_steps}-step grid is not part of the {2 * student_steps}-step grid of T = "
                          f"{timesteps}")
    return StudentGrid(t=student, t_mid=teacher[1::2], t_next=[*teacher[2::2], None])


# ----------------------------------------------------------------------------- the training objective

class DistillationLoss(Loss):
    """The loss of one distillation round, behind the training loop's loss interface (``ddpm.losses``).

    ``teacher(x_t, t_batch, **model_kwargs)`` is the frozen teacher network trained with
    ``teacher_objective``; ``teacher_clip`` clips its x0 estimate as its own sampler would. Both
    networks are read through a :class:`ddpm.denoiser.Denoiser`, the teacher's bound once.
    :meth:`draw_timesteps` draws student timesteps uniformly from the grid (Algorithm 2: t = i / N);
    ``offset_noise`` is the run's.
    """

    def __init__(self, teacher: Callable, schedule: NoiseSchedule, grid: StudentGrid, *,
                 teacher_objective: str, teacher_clip: bool = False, weighting: str = "snr+1",
                 student_objective: str = STUDENT_OBJECTIVE, device: torch.device | str = "cpu",
                 offset_noise: float = 0.0):
        distillation_weight(torch.zeros(1), weighting)          # validates the name
        if isinstance(teacher, torch.nn.Module):
            teacher.eval().requires_grad_(False)
        super().__init__(schedule.to(device))
        self.teacher, self.grid, self.weighting, self.offset_noise = teacher, grid, weighting, offset_noise
        self.teacher_objective, self.teacher_clip, self.student_objective = teacher_objective, teacher_clip, student_objective
        self.teacher_denoiser = Denoiser(teacher, self.schedule, objective=teacher_objective, clip=teacher_clip)
        T = schedule.timesteps
        # alpha-bar with one more entry, index T, for "the data" (alpha-bar = 1).
        self.alpha_bar = torch.cat([schedule.alphas_cumprod.double(), torch.ones(1, dtype=torch.float64)]).to(device)
        self.t = torch.tensor(grid.t, dtype=torch.long, device=device)
        self.t_mid = torch.tensor(grid.t_mid, dtype=torch.long, device=device)
        self.t_next = torch.tensor([T if s is None else s for s in grid.t_next], dtype=torch.long, device=device)
        self.index = torch.full((T,), -1, dtype=torch.long, device=device)
        self.index[self.t] = torch.arange(len(grid.t), device=device)

    def draw_timesteps(self, batch_size: int, generator: torch.Generator,
                       device: torch.device | str | None = None) -> tuple[torch.Tensor, None]:
        i = torch.randint(0, len(self.grid.t), (batch_size,), generator=generator, device=generator.device)
        return self.t[i.to(self.t.device)], None

    def draw_extras(self, noise: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        if self.offset_noise > 0:
            noise = noise + offset_noise(noise.shape, self.offset_noise, generator=generator, device=noise.device)
        return noise, {}

    def teacher_predict(self, z: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None):
        """(eps_pred, x0_pred) of the teacher at per-sample timesteps, clipped as its sampler would."""
        return self.teacher_denoiser.predict(z, t, model_kwargs=model_kwargs)

    @torch.no_grad()
    def targets(self, z_t: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None) -> torch.Tensor:
        """x~ for a batch of noised images at student timesteps ``t``."""
        i = self.index[t]
        if bool((i < 0).any()):
            raise ConfigError("timesteps off the student's grid")
        mid, nxt = self.t_mid[i], self.t_next[i]
        abar_t, abar_next = self.alpha_bar[t].float(), self.alpha_bar[nxt].float()
        z_next = teacher_two_steps(lambda z, s: self.teacher_predict(z, s, model_kwargs), z_t, t, mid, abar_t,
                                   self.alpha_bar[mid].float(), abar_next)
        return two_step_target(z_t, z_next, abar_t, abar_next)

    def losses(self, net: Callable, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, *,
               model_kwargs: dict | None = None) -> torch.Tensor:
        """Per-sample loss w(t) ||x^(z_t) - x~||^2 (mean over pixels) for data x0 in [-1, 1]."""
        z_t = q_sample(self.schedule, x0, t, noise)                       # Eq. 4
        x_tilde = self.targets(z_t, t, model_kwargs)
        student = Denoiser(net, self.schedule, objective=self.student_objective)
        _, x0_pred = student.predict(z_t, t, model_kwargs=model_kwargs)
        mse = (x0_pred - x_tilde).pow(2).mean(dim=tuple(range(1, x0.ndim)))
        return mse * distillation_weight(self.alpha_bar[t].float(), self.weighting)


DistillationObjective = DistillationLoss          # its earlier name


# ----------------------------------------------------------------------------- the plan

@dataclass
class DistillConfig:
    """What ``ddpm distill`` does: ``rounds`` rounds from ``teacher`` at ``teacher_steps`` DDIM steps."""

    teacher: str                       # the teacher checkpoint file
    rounds: int = 1                    # each halves the steps: the last student takes teacher_steps / 2^rounds
    teacher_steps: int = 256           # the teacher's DDIM steps in round 1
    weighting: str = "snr+1"           # snr+1 (= the v MSE) | truncated-snr

    def __post_init__(self) -> None:
        if isinstance(self.teacher, os.PathLike):
            self.teacher = os.fspath(self.teacher)
        for name in ("rounds", "teacher_steps"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be a positive integer; got {value!r}")
        if self.weighting not in DISTILL_WEIGHTINGS:
            raise ConfigError(f"unknown distillation weighting {self.weighting!r}; "
                              f"choose from {', '.join(DISTILL_WEIGHTINGS)}")
        if self.teacher_steps < 2 ** self.rounds:
            raise ConfigError(f"{self.rounds} rounds halve {self.teacher_steps} steps below 1; use at most "
                              f"{int(math.log2(self.teacher_steps))} rounds or more --teacher-steps")
        if self.teacher_steps % 2 ** self.rounds:
            raise ConfigError(f"{self.teacher_steps} teacher steps cannot be halved {self.rounds} times (every "
                              f"round needs an even count); use a multiple of {2 ** self.rounds}, e.g. "
                              f"{2 ** max(self.rounds, int(math.log2(self.teacher_steps)))}")

    def student_steps(self, round_: int) -> int:
        """The student's steps in round ``round_`` (1-based)."""
        return self.teacher_steps // 2 ** round_


def default_teacher_steps(teacher: RunConfig) -> int:
    """A distilled teacher's own step count; else 256, or the largest power of two below T when T < 256."""
    sampling = teacher.sampling
    if sampling is not None and sampling.sampler == "ddim" and sampling.steps:
        return sampling.steps
    return min(256, 2 ** int(math.log2(teacher.diffusion.timesteps)))


def load_teacher_config(path: str | os.PathLike) -> tuple[Path, RunConfig]:
    """The teacher's checkpoint file and configuration; a missing, corrupt, foreign or non-finite file is
    refused here, before the run directory exists (the whole file is read and verified)."""
    _, meta = load_checkpoint(path)
    try:
        return resolve_checkpoint(path), RunConfig.from_dict(meta["config"])
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(f"{path} has an unusable configuration: {exc}") from None


def check_teacher(teacher: RunConfig, config: DistillConfig) -> None:
    """Refuse plans the teacher cannot take: too many steps for T, or a distilled teacher at another count."""
    T = teacher.diffusion.timesteps
    if teacher.diffusion.formulation == "edm":
        raise ConfigError("distillation needs a ddpm teacher (DDIM steps on its T-step schedule); this one is "
                          "an EDM model, which has no timesteps")
    if teacher.diffusion.variance == "learned-range" or teacher.diffusion.self_condition:
        raise ConfigError("distillation needs a teacher with fixed variances and without self-conditioning; "
                          "this one has " + ("learned variances" if teacher.diffusion.variance == "learned-range"
                                             else "self-conditioning"))
    if config.teacher_steps > T:
        raise ConfigError(f"--teacher-steps {config.teacher_steps} is more than the teacher's T = {T}")
    own = teacher.sampling.steps if teacher.sampling is not None and teacher.sampling.sampler == "ddim" else None
    if own and own != config.teacher_steps:
        raise ConfigError(f"the teacher is a distilled student of {own} DDIM steps; distil it from --teacher-steps "
                          f"{own}, not {config.teacher_steps}")


def student_run_config(teacher: RunConfig, train: TrainConfig, data: DataConfig, student_steps: int,
                       init: str) -> RunConfig:
    """An ordinary run configuration for a student: the teacher's model and diffusion, predicting v,
    initialised from ``init`` (the round's teacher), sampled by default with DDIM over its N steps.

    Its sampler does not clip x0: the two-step targets x~ lie outside [-1, 1] whenever the teacher's
    two steps differ from one, and clipping the student's estimate would undo what it learned.
    """
    return RunConfig(preset=teacher.preset, model=teacher.model,
                     diffusion=dataclasses.replace(teacher.diffusion, objective=STUDENT_OBJECTIVE),
                     data=data, train=dataclasses.replace(train, init=init),
                     sampling=SamplingOptions(sampler="ddim", steps=student_steps, spacing="trailing", eta=0.0,
                                              clip=False))


def _teacher_loss(path: str, device: torch.device, grid: StudentGrid, weighting: str) -> DistillationLoss:
    diffusion, _ = load_diffusion(path, device=device, weights="ema")
    return DistillationLoss(diffusion.model, diffusion.schedule, grid, teacher_objective=diffusion.objective,
                            teacher_clip=x0_clip(diffusion, diffusion.default_sampling), weighting=weighting, device=device,
                            offset_noise=diffusion.config.offset_noise)


def _round_state(round_dir: Path, steps: int) -> str:
    """'done' (final checkpoint and grid written), 'partial' (a checkpoint to resume from) or 'new'."""
    found = list_checkpoints(round_dir)
    if not found:
        return "new"
    return "done" if found[-1][0] >= steps and (round_dir / "samples.png").is_file() else "partial"


def _link_student(run_dir: Path, round_dir: Path) -> None:
    """RUN_DIR/student -> the newest finished round (a relative link, replaced atomically)."""
    link, tmp = run_dir / "student", run_dir / ".student.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(round_dir.name, tmp)
    os.replace(tmp, link)


def new_plan(checkpoint: str | None, rounds: int | None, *, steps_per_round: int | None = None,
             teacher_steps: int | None = None, weighting: str | None = None, data: str | None = None,
             data_root: str | None = None, train_options: dict | None = None) -> tuple[DistillConfig, TrainConfig, DataConfig]:
    """A new plan from the teacher's configuration: its training settings (a round restarts the schedule:
    no warm-up, no init, no time limit, evaluation or milestones; the precision is ``auto``, resolved on
    this machine, not the teacher's) overridden by ``train_options``, its data unless ``data`` /
    ``data_root`` name other data."""
    if not checkpoint or not rounds:
        raise ConfigError("distill needs --checkpoint TEACHER and --rounds R (or --resume RUN_DIR)")
    teacher_path, teacher = load_teacher_config(checkpoint)
    config = DistillConfig(teacher=str(teacher_path.resolve()), rounds=rounds,
                           teacher_steps=teacher_steps or default_teacher_steps(teacher), weighting=weighting or "snr+1")
    check_teacher(teacher, config)
    base = dataclasses.replace(teacher.train, steps=steps_per_round or 1000, warmup_steps=0, init=None,
                               time_limit=0.0, eval_every=0, milestone_every=0, precision="auto")
    try:
        train = dataclasses.replace(base, **(train_options or {}))
    except TypeError as exc:
        raise ConfigError(f"invalid option: {exc}") from None
    data_cfg = teacher.data
    if data or data_root:
        data_cfg = DataConfig(name=data or teacher.data.name, root=data_root, split=teacher.data.split,
                              image_size=teacher.data.image_size, channels=teacher.data.channels,
                              hflip=teacher.data.hflip, strict=teacher.data.strict)
        # other data is read once here, so that an unreadable or empty one is refused before any folder exists
        load_dataset(data_cfg.name, data_root=data_cfg.root, split=data_cfg.split, image_size=data_cfg.image_size,
                     channels=data_cfg.channels, strict=data_cfg.strict)
    return config, train, data_cfg


def resumed_plan(run_dir: str | os.PathLike, *, given: list[str] = (), out=None,
                 device: str | None = None) -> tuple[DistillConfig, TrainConfig, DataConfig]:
    """The saved plan of ``run_dir``; only the device may change (``given`` names any other option set)."""
    if given:
        raise ConfigError(f"{', '.join(given)} cannot be combined with --resume: the run keeps its saved plan "
                          "(only --device may change)")
    if out and Path(out).resolve() != Path(run_dir).resolve():
        raise ConfigError("--out and --resume name different directories; a resumed run stays in its own")
    config, train, data = read_plan(Path(run_dir))
    return config, dataclasses.replace(train, device=device) if device else train, data


@dataclass
class DistillResult:
    run_dir: Path
    rounds: list                     # TrainResult of each round run now (finished rounds are skipped)
    student: Path                    # the last round's final checkpoint
    student_steps: int
    seconds: float


def write_plan(run_dir: Path, config: DistillConfig, train: TrainConfig, data: DataConfig) -> None:
    data_dict = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(data).items()}
    write_json(run_dir / PLAN_FILE, {"distill": asdict(config), "train": asdict(train), "data": data_dict})


def read_plan(run_dir: Path) -> tuple[DistillConfig, TrainConfig, DataConfig]:
    path = Path(run_dir) / PLAN_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a distillation run (no {PLAN_FILE}); start one with ddpm distill --out")
    try:
        plan = json.loads(path.read_text())
        return DistillConfig(**plan["distill"]), TrainConfig(**plan["train"]), DataConfig(**plan["data"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is corrupt: {exc}") from None


def distill(config: DistillConfig, train: TrainConfig, run_dir: str | os.PathLike, *, data: DataConfig | None = None,
            resume: bool = False, progress: bool = True, on_round: Callable | None = None) -> DistillResult:
    """Run (or, with ``resume``, continue) every round of ``config`` into ``run_dir``.

    ``train.steps`` is the number of optimizer steps per round. Round r is the ordinary run directory
    ``run_dir/round-rr`` (its teacher: the original teacher for r = 1, else round r - 1's final
    checkpoint); ``run_dir/student`` links to the newest finished round. ``data`` (default: the
    teacher's) is what the students are trained on. ``on_round(r, teacher_steps, student_steps)`` is
    called before each round that runs. Under torchrun every process runs this function and each
    round trains data-parallel like ``ddpm train``; rank 0 alone writes the plan and the round files.
    """
    start = time.time()
    run_dir = Path(run_dir)
    teacher_path, teacher = load_teacher_config(config.teacher)
    check_teacher(teacher, config)
    data = data or teacher.data
    device = distributed.training_device(train.device)
    chosen = None
    if train.precision == "auto":             # resolved once (rank 0's verdict on every rank): the plan records it
        chosen = resolve_precision(train.precision, device)
        train = dataclasses.replace(train, precision=chosen.precision)
    with distributed.agree("writing the distillation plan"):
        if not resume and distributed.is_main():
            run_dir.mkdir(parents=True, exist_ok=True)
            write_plan(run_dir, config, train, data)
    images, results = None, []
    for r in range(1, config.rounds + 1):
        round_dir = run_dir / f"round-{r:02d}"
        init = str(teacher_path) if r == 1 else str(resolve_checkpoint(run_dir / f"round-{r - 1:02d}"))
        steps = config.student_steps(r)
        round_config = student_run_config(teacher, train, data, steps, init)
        state = _prepare_round(run_dir, round_dir, train.steps, r, config, init)
        if state == "done":
            continue
        if images is None:
            images = load_training_data(round_config)
            if chosen is not None and progress and distributed.is_main():
                print(chosen.line(), file=sys.stderr)     # once, when the first round's checks have passed
        if on_round is not None:
            on_round(r, 2 * steps, steps)
        loss = _teacher_loss(init, device, student_grid(teacher.diffusion.timesteps, steps), config.weighting)
        try:
            results.append(training.train(round_config, round_dir, data=images, resume=state == "partial",
                                     progress=progress, loss=loss))
        except TrainingInterrupted as exc:      # the round's own hint would name ddpm train
            said = str(exc).split("; continue with:")[0]
            raise TrainingInterrupted(f"{said}; continue with: ddpm distill --resume {run_dir}", exc.exit_code) from None
        if distributed.is_main():
            _link_student(run_dir, round_dir)
    last = run_dir / f"round-{config.rounds:02d}"
    return DistillResult(run_dir=run_dir, rounds=results, student=resolve_checkpoint(last),
                         student_steps=config.student_steps(config.rounds), seconds=time.time() - start)


def _prepare_round(run_dir: Path, round_dir: Path, steps: int, r: int, config: DistillConfig, init: str) -> str:
    """Round r's state ('done', 'partial' or 'new', as rank 0 sees it) and, on rank 0, its directory:
    a finished round is linked as the student, a round killed before its first checkpoint is cleared."""
    state = distributed.broadcast_object(_round_state(round_dir, steps) if distributed.is_main() else None)
    with distributed.agree("preparing a distillation round"):
        if not distributed.is_main():
            return state
        if state == "done":
            _link_student(run_dir, round_dir)
            return state
        if state == "new" and round_dir.exists():
            shutil.rmtree(round_dir)           # nothing to keep
        round_dir.mkdir(parents=True, exist_ok=True)
        student_steps = config.student_steps(r)
        write_json(round_dir / ROUND_FILE, {"round": r, "rounds": config.rounds, "teacher": init,
                                            "teacher_steps": 2 * student_steps, "student_steps": student_steps,
                                            "weighting": config.weighting, "student_objective": STUDENT_OBJECTIVE})
    return state
