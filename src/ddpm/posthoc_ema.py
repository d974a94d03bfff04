"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
EDM2, Sec. 3): track two power-function EMAs while training, store them every N steps, and
afterwards rebuild the average of any length sigma_rel at any stored step by least squares.

Glossary (EDM2's symbols; the step count t is 1-based here: t = steps done, t = 1 after the first):

* theta_t: the raw weights after step t; theta-hat_t: their average;
* gamma: the exponent of a power-function profile; the average at time t weighs the past as
  p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on 0 < tau <= t;
* sigma_rel: the profile's standard deviation relative to t (its "relative length");
  sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))                         (EDM2 Eq. 123);
* beta_t = (1 - 1/t)^(gamma + 1), the update theta-hat_t = beta_t theta-hat_{t-1} + (1 - beta_t) theta_t (Eq. 127).

That update is the profile exactly, step by step: unrolled, theta-hat_t = sum_tau w_tau theta_tau with
w_tau = (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1), the integral of p_t over (tau - 1, tau]
(:func:`profile_weights`), so the continuous inner products of EDM2's Algorithm 3 apply to the
discrete averages without approximation.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .checkpoint import checkpoint_path, load_checkpoint, read_metadata, tensor_checksum
from .errors import CheckpointError, ConfigError
from .fileio import atomic_write

__all__ = ["DEFAULT_SIGMA_RELS", "DEFAULT_GAMMAS", "SIGMA_REL_MAX", "MAX_ERROR", "DEFAULT_SWEEP",
           "gamma_to_sigma_rel", "sigma_rel_to_gamma", "power_beta", "profile_weights", "profile_inner",
           "solve_coefficients", "PowerEMA", "SNAPSHOT_DIR", "snapshot_path", "list_snapshots", "save_snapshot",
           "read_snapshot_meta", "load_snapshot", "Reconstruction", "plan_reconstruction", "reconstruct",
           "reconstructed_weights", "reconstruction_checkpoint"]

SIGMA_REL_MAX = 1.0 / (2.0 * math.sqrt(3.0))  # sigma_rel at gamma = 0 (a plain running mean); longer needs gamma < 0
MAX_ERROR = 0.1                                # refuse a reconstruction whose profile misses by more (relative L2)
SNAPSHOT_DIR = "ema-snapshots"
SNAPSHOT_FORMAT = 1
_SNAPSHOT_FILE = re.compile(r"^step-(\d+)\.safetensors$")


def gamma_to_sigma_rel(gamma: float) -> float:
    """sigma_rel of the power-function profile with exponent gamma (EDM2 Eq. 123)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma >= 0 of relative length sigma_rel: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0 (EDM2 Eq. 126, Algorithm 2)."""
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)) or not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ConfigError(f"sigma_rel must be a number in (0, {SIGMA_REL_MAX:.4f}) (a power-function EMA with "
                          f"gamma > 0); got {sigma_rel!r}")
    s2 = float(sigma_rel) ** -2
    return float(np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2]).real.max())


DEFAULT_SIGMA_RELS = (0.05, 0.10)                 # EDM2's two stored profiles
DEFAULT_GAMMAS = tuple(sigma_rel_to_gamma(s) for s in DEFAULT_SIGMA_RELS)   # 16.97, 6.94
DEFAULT_SWEEP = tuple(round(0.025 * k, 3) for k in range(1, 11))           # 0.025 ... 0.25


def power_beta(gamma: float, t: int) -> float:
    """beta_t = (1 - 1/t)^(gamma + 1) (EDM2 Eq. 127); 0 at t = 1, so the first average is theta_1."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def profile_weights(gamma: float, t: int) -> np.ndarray:
    """w_tau, tau = 1 .. t: the weight of theta_tau in the tracked average at t (float64, summing to 1)."""
    tau = np.arange(1, t + 1, dtype=np.float64)
    return (tau / t) ** (gamma + 1.0) - ((tau - 1.0) / t) ** (gamma + 1.0)


def profile_inner(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """<p_a, p_b> = integral of p_{t_a}^{gamma_a} p_{t_b}^{gamma_b} over tau (EDM2 Eq. 151, Algorithm 3):
    (gamma_a + 1)(gamma_b + 1) / (gamma_a + gamma_b + 1) * (t_lo / t_hi)^gamma_hi / t_hi, where t_hi is the
    longer of the two and gamma_hi its exponent. Broadcasts; float64."""
    t_a, gamma_a, t_b, gamma_b = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64)
                                                       for v in (t_a, gamma_a, t_b, gamma_b)))
    t_lo, t_hi = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
    gamma_hi = np.where(t_a >= t_b, gamma_a, gamma_b)
    return (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1) * (t_lo / t_hi) ** gamma_hi / t_hi


def solve_coefficients(steps: Sequence[int], gammas: Sequence[float], step: int, gamma: float
                       ) -> tuple[np.ndarray, float]:
    """Coefficients x of the stored averages (``steps[i]``, ``gammas[i]``) whose combination best matches
    the profile (``step``, ``gamma``) in L2 (EDM2 Algorithm 3): A x = b with A_ij = <p_i, p_j>,
    b_i = <p_i, p>, then scaled to sum to 1 so the weights of the combination do. Also returns the
    relative L2 error ||sum_i x_i p_i - p|| / ||p|| of that combination."""
    t, g = np.asarray(steps, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    A = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner(t, g, step, gamma)
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    x = x / x.sum()                                                   # Algorithm 3: weights sum to 1
    pp = float(profile_inner(step, gamma, step, gamma))
    squared = float(x @ A @ x - 2.0 * x @ b + pp)
    return x, math.sqrt(max(squared, 0.0) / pp)


def reconstructed_weights(steps: Sequence[int], gammas: Sequence[float], coefficients: Sequence[float],
                          step: int) -> np.ndarray:
    """The weight of each theta_tau, tau = 1 .. step, in the combination sum_i x_i theta-hat_i (exact:
    each stored average weighs the past by :func:`profile_weights`)."""
    w = np.zeros(step, dtype=np.float64)
    for t_i, g_i, x_i in zip(steps, gammas, coefficients):
        w[:t_i] += x_i * profile_weights(g_i, t_i)
    return w


class PowerEMA:
    """Power-function EMAs of a model, one per exponent in ``gammas`` (EDM2's defaults: sigma_rel 0.05
    and 0.10); buffers are copied as they are. ``update(model, t)`` takes the step count t explicitly
    (1-based), so a resumed run continues exactly."""

    def __init__(self, model: nn.Module, gammas: Sequence[float] = DEFAULT_GAMMAS):
        self.gammas = _check_gammas(gammas)
        self.models = [copy.deepcopy(model).eval().requires_grad_(False) for _ in self.gammas]

    @property
    def sigma_rels(self) -> tuple[float, ...]:
        return tuple(gamma_to_sigma_rel(g) for g in self.gammas)

    @torch.no_grad()
    def update(self, model: nn.Module, t: int) -> None:
        """theta-hat_t = beta_t theta-hat_{t-1} + (1 - beta_t) theta_t for each profile (EDM2 Eq. 127)."""
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ValueError(f"the step count t of a power EMA update is 1-based; got {t!r}")
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        names = list(params)
        for gamma, average in zip(self.gammas, self.models):
            ema_params, ema_buffers = dict(average.named_parameters()), dict(average.named_buffers())
            if ema_params.keys() != params.keys() or ema_buffers.keys() != buffers.keys():
                raise ValueError("power EMA and model have different parameter or buffer names")
            torch._foreach_lerp_([ema_params[n] for n in names], [params[n].detach() for n in names],
                                 1.0 - power_beta(gamma, t))
            for name, b in buffers.items():
                ema_buffers[name].copy_(b)

    def buffer_names(self) -> list[str]:
        return [name for name, _ in self.models[0].named_buffers()]

    def state_tensors(self, prefix: str = "phema") -> dict[str, torch.Tensor]:
        """Profile i's state dict under ``prefix.i.``, for a checkpoint or a snapshot."""
        return {f"{prefix}.{i}.{k}": v for i, m in enumerate(self.models) for k, v in m.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], path: str, prefix: str = "phema") -> None:
        """Load every profile, strictly (names, shapes, and no profile more or less than this one keeps)."""
        held = sorted({int(k.split(".")[1]) for k in tensors if re.match(rf"^{re.escape(prefix)}\.\d+\.", k)})
        if held != list(range(len(self.models))):
            raise CheckpointError(f"{path} holds {len(held)} power EMA profile(s); this run keeps {len(self.models)}")
        for i, m in enumerate(self.models):
            p = f"{prefix}.{i}."
            try:
                m.load_state_dict({k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}, strict=True)
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0]
                raise CheckpointError(f"{path}: the {prefix}.{i}.* weights do not match the model's "
                                      f"architecture ({first})") from None


def _check_gammas(gammas: Sequence[float]) -> tuple[float, ...]:
    out = []
    for g in gammas:
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g <= 0:
            raise ConfigError(f"a power EMA exponent gamma must be a finite number > 0; got {g!r}")
        if float(g) in out:
            raise ConfigError(f"power EMA exponent {float(g)!r} is given twice")
        out.append(float(g))
    if not out:
        raise ConfigError("give at least one power EMA profile")
    return tuple(out)


# ----------------------------------------------------------------------------- snapshots

def snapshot_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"step-{step:07d}.safetensors"


def list_snapshots(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of a run's power EMA snapshots, oldest first."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _SNAPSHOT_FILE.match(p.name)))


def save_snapshot(run_dir: str | os.PathLike, step: int, power_ema: PowerEMA) -> Path:
    """Write every profile's average after ``step`` steps to ``ema-snapshots/step-NNNNNNN.safetensors``:
    tensors ``phema.<i>.<name>``; JSON metadata ``ddpm_ema_snapshot`` with the step, the gammas (and
    their sigma_rels) and the buffer names, and a ``checksum`` over the tensors. Written atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in power_ema.state_tensors().items()}
    info = {"format_version": SNAPSHOT_FORMAT, "step": int(step), "gammas": list(power_ema.gammas),
            "sigma_rels": list(power_ema.sigma_rels), "buffers": power_ema.buffer_names()}
    header = {"ddpm_ema_snapshot": json.dumps(info), "checksum": tensor_checksum(tensors)}
    path = snapshot_path(run_dir, step)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=header)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)          # safetensors creates files 0600; honour the umask, as checkpoints do

    try:
        return atomic_write(path, write)
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"could not save the EMA snapshot {path}: {exc}") from None


def read_snapshot_meta(path: str | os.PathLike) -> dict:
    """A snapshot's metadata (step, gammas, sigma_rels, buffers), checked, without reading tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        info = json.loads(header["ddpm_ema_snapshot"])
    except (SafetensorError, OSError, ValueError, KeyError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not a ddpm EMA snapshot ({type(exc).__name__})") from None
    ok = (isinstance(info, dict) and info.get("format_version") == SNAPSHOT_FORMAT
          and isinstance(info.get("step"), int) and not isinstance(info.get("step"), bool) and info["step"] >= 1
          and isinstance(info.get("gammas"), list) and isinstance(info.get("buffers"), list))
    if not ok:
        raise CheckpointError(f"{path} has unusable EMA snapshot metadata")
    try:
        info["gammas"] = list(_check_gammas(info["gammas"]))
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    info["checksum"] = header.get("checksum")
    return info


def load_snapshot(path: str | os.PathLike) -> tuple[list[dict[str, torch.Tensor]], dict]:
    """(one state dict per profile, metadata) of a snapshot; its checksum and finiteness are verified."""
    info = read_snapshot_meta(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt: {exc}") from None
    if tensor_checksum(tensors) != info["checksum"]:
        raise CheckpointError(f"{path} failed its checksum: the file is corrupt or was modified")
    profiles = []
    for i in range(len(info["gammas"])):
        p = f"phema.{i}."
        profiles.append({k[len(p):]: v for k, v in tensors.items() if k.startswith(p)})
    if sum(map(len, profiles)) != len(tensors) or not all(profiles) or any(
            profiles[0].keys() != q.keys() for q in profiles):
        raise CheckpointError(f"{path}: its tensors do not match its {len(profiles)} profile(s)")
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path} holds non-finite weights (NaN or inf in {name}); it cannot be used")
    return profiles, info


# ----------------------------------------------------------------------------- reconstruction

@dataclass
class Reconstruction:
    """The average of relative length ``sigma_rel`` at ``step``, rebuilt from stored snapshots."""

    sigma_rel: float
    gamma: float
    step: int
    inputs: list[tuple[int, float]]            # (snapshot step, gamma) of each stored average used
    coefficients: list[float]                  # x_i, summing to 1
    rel_error: float                           # ||sum_i x_i p_i - p|| / ||p||, relative L2
    state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def weights(self) -> np.ndarray:
        """The weight of each theta_tau, tau = 1 .. step, in this reconstruction (for plots)."""
        steps, gammas = zip(*self.inputs)
        return reconstructed_weights(steps, gammas, self.coefficients, self.step)


def plan_reconstruction(snapshots: Sequence[tuple[int, Sequence[float]]], sigma_rel: float, step: int | None = None,
                        max_error: float = MAX_ERROR) -> Reconstruction:
    """The coefficients (no tensors read) of the average of length ``sigma_rel`` at ``step`` (default: the
    last snapshot) from ``snapshots``, (step, gammas) pairs; every snapshot at or before ``step`` is used.

    One-line :class:`ConfigError` when ``sigma_rel`` is no power-function length, when ``step`` is before
    the first snapshot or after the last, or when the best combination misses the profile by more than
    ``max_error`` (relative L2): the stored profiles do not reach that length at that step.
    """
    gamma = sigma_rel_to_gamma(sigma_rel)
    if not snapshots:
        raise ConfigError("no EMA snapshots to reconstruct from (train with --ema-snapshot-every N)")
    first, last = snapshots[0][0], snapshots[-1][0]
    step = last if step is None else step
    if isinstance(step, bool) or not isinstance(step, int) or not first <= step <= last:
        raise ConfigError(f"step {step!r} is outside the stored EMA snapshots (steps {first} to {last})")
    inputs = [(s, g) for s, gammas in snapshots if s <= step for g in gammas]
    x, err = solve_coefficients(*zip(*inputs), step, gamma)
    if err > max_error:
        stored = ", ".join(f"{gamma_to_sigma_rel(g):.3f}" for g in sorted(set(g for _, g in inputs), reverse=True))
        raise ConfigError(f"sigma_rel {sigma_rel:g} at step {step} is beyond the reach of the stored profiles "
                          f"(sigma_rel {stored}, {len(snapshots)} snapshot(s)): the best combination misses it by "
                          f"{100 * err:.1f}% (limit {100 * max_error:.0f}%); snapshot more often or choose "
                          "a length nearer the stored ones")
    return Reconstruction(float(sigma_rel), gamma, step, inputs, [float(v) for v in x], err)


def reconstruct(run_dir: str | os.PathLike, sigma_rels: Sequence[float] | float, step: int | None = None,
                max_error: float = MAX_ERROR) -> list[Reconstruction]:
    """Rebuild the averages of each length in ``sigma_rels`` at ``step`` (default: the last snapshot)
    from ``run_dir/ema-snapshots``, reading each snapshot once; sums in float64, results in the stored
    dtype; buffers are those of the last snapshot used. Every length is checked before any file is read."""
    if isinstance(sigma_rels, (int, float)):
        sigma_rels = [sigma_rels]
    if not sigma_rels:
        raise ConfigError("give at least one sigma_rel to reconstruct")
    found = list_snapshots(run_dir)
    metas = [read_snapshot_meta(path) for _, path in found]
    for (s, path), info in zip(found, metas):
        if info["step"] != s:
            raise CheckpointError(f"{path} holds the snapshot of step {info['step']}, not {s}")
    plans = [plan_reconstruction([(info["step"], info["gammas"]) for info in metas], s, step, max_error)
             for s in sigma_rels]
    used = [(path, info) for (s, path), info in zip(found, metas) if s <= plans[0].step]
    sums: list[dict[str, torch.Tensor]] = [{} for _ in plans]
    column = 0
    for n, (path, info) in enumerate(used):
        profiles, _ = load_snapshot(path)
        if n == 0:
            names = profiles[0].keys()
        elif profiles[0].keys() != names:
            raise CheckpointError(f"{path} holds other weights than {used[0][0]}: not snapshots of one model")
        for j, state in enumerate(profiles):
            for plan, acc in zip(plans, sums):
                x = plan.coefficients[column + j]
                for name, t in state.items():
                    if name in info["buffers"] or not t.is_floating_point():
                        if n == len(used) - 1 and j == 0:
                            acc[name] = t.clone()
                    else:
                        acc[name] = acc.get(name, 0.0) + x * t.double()
        column += len(profiles)
    dtypes = {name: t.dtype for name, t in profiles[0].items()}
    for plan, acc in zip(plans, sums):
        plan.state = {name: t.to(dtypes[name]) for name, t in acc.items()}
    return plans


def reconstruction_checkpoint(run_dir: str | os.PathLike, rec: Reconstruction) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a checkpoint whose ``ema.*`` weights are the reconstruction, for
    :func:`ddpm.checkpoint.save_checkpoint`: the configuration is the run's newest checkpoint's, and
    ``model.*`` holds the raw weights of the checkpoint at the same step when the run kept one (else the
    reconstruction again, said in ``posthoc_ema.raw``)."""
    meta = read_metadata(run_dir)
    raw, raw_from = rec.state, "reconstruction"
    at_step = checkpoint_path(run_dir, rec.step)
    if at_step.is_file():
        tensors, _ = load_checkpoint(at_step)
        raw, raw_from = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, str(at_step)
    out = {**{f"model.{k}": v.clone() for k, v in raw.items()},     # never the ema.* storage: saved apart
           **{f"ema.{k}": v for k, v in rec.state.items()}}
    info = {"sigma_rel": rec.sigma_rel, "gamma": rec.gamma, "rel_error": rec.rel_error, "raw": raw_from,
            "inputs": [[s, g, x] for (s, g), x in zip(rec.inputs, rec.coefficients)]}
    return out, {"step": rec.step, "config": meta["config"], "posthoc_ema": info}
