"""What a checkpoint's metadata may hold, checked as data before anything uses it.

A checksum only says that the file is the one that was written; it says nothing about whether
what was written makes sense (metadata can be edited and both checksums recomputed). So every
field a reader uses -- on load, ``--init``, ``--resume``, ``inspect``, ``export``, ``import`` -- is
checked here, in one place, for its type, its range and its agreement with the tensors (names,
shapes, dtypes). A refusal is a :class:`~ddpm.errors.CheckpointError` naming the field.

The tensors are described as ``{name: (dtype, shape)}`` with safetensors' dtype names (``F32``,
``BF16``, ``I64`` ...), so the header alone can be checked (:func:`ddpm.checkpoint.read_metadata`)
as well as loaded tensors (:func:`tensor_layout`).

A training checkpoint (one with an ``optimizer`` entry) must also carry what an exact resume
needs: ``rng``, ``data_position``, ``counters`` and ``ema_updates``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from .config import MAX_BATCH, MAX_COUNT, DiffusionConfig, RunConfig
from .errors import CheckpointError, ConfigError

__all__ = ["check_checkpoint", "tensor_layout", "WEIGHT_DTYPE", "RESUME_FIELDS", "ema_decay_of_key", "weight_group"]

WEIGHT_DTYPE = "F32"                 # model.* and ema.*: the float32 master weights training keeps
RESUME_FIELDS = ("rng", "data_position", "counters", "ema_updates")
PREFIXES = ("model", "ema", "optim", "timestep_sampler")
COUNTERS = ("step", "bad_steps", "bad_in_row", "scaler_skips")    # ddpm.train.Counters, as saved
SCALER = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")   # GradScaler.state_dict
_OPTIM_NAME = re.compile(r"^optim\.(\d+)\.([A-Za-z_]\w*)$")
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}
_TORCH_RNG_BYTES = 5056              # torch.get_rng_state().numel() for the CPU Mersenne Twister
_MT_WORDS = 624                      # words of the Mersenne Twister state (Python adds the position)


def tensor_layout(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (safetensors dtype, shape)}`` of loaded tensors."""
    return {k: (_SAFETENSORS_DTYPES.get(t.dtype, str(t.dtype)), tuple(t.shape)) for k, t in tensors.items()}


class _Refuse:
    """Raises one :class:`CheckpointError` naming the file and the field."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, field: str, what: str):
        raise CheckpointError(f"{self.path} has an invalid '{field}' in its metadata: {what}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_in(refuse, field: str, v, low: int, high: int) -> int:
    if not _is_int(v) or not low <= v <= high:
        refuse(field, f"{v!r} (expected an integer from {low:,} to {high:,})")
    return v


def _int_list(refuse, field: str, v, length: int, high: int) -> None:
    if not (isinstance(v, list) and len(v) == length and all(_is_int(x) and 0 <= x <= high for x in v)):
        refuse(field, f"expected {length} integers from 0 to {high:,}")


def check_checkpoint(path: Path, meta: dict, layout: dict[str, tuple[str, tuple[int, ...]]]) -> RunConfig | None:
    """Check the metadata ``meta`` of the checkpoint ``path`` against its tensors' ``layout``.

    Returns the validated configuration (None for a 1D sequence model of ``ddpm.compat.lucidrains_1d``);
    raises :class:`CheckpointError` naming the first bad field.
    """
    refuse = _Refuse(path)
    step = meta.get("step")
    if not _is_int(step) or not 0 <= step <= MAX_COUNT:
        raise CheckpointError(f"{path} has no valid step in its metadata ('step' is {step!r}; expected an integer "
                              f"from 0 to {MAX_COUNT:,})")
    if "config" not in meta:
        raise CheckpointError(f"{path} has no configuration in its metadata (the 'config' entry is missing)")
    if not isinstance(meta["config"], dict):
        raise CheckpointError(f"{path} has an unusable configuration: 'config' is a "
                              f"{type(meta['config']).__name__}, not an object")
    if "unet1d" in meta["config"]:            # a sequence model of the lucidrains 1D layer (Trainer1D)
        _check_sequence_config(refuse, meta["config"])
        _check_tensor_names(refuse, layout)
        _check_weights(refuse, layout)
        return None
    try:
        config = RunConfig.from_dict(meta["config"])
    except ConfigError as exc:
        refuse("config", str(exc))
    _check_tensor_names(refuse, layout)
    _check_weights(refuse, layout)
    _check_counts(refuse, meta, step)
    _check_extras(refuse, meta, config)
    _check_averages(refuse, meta, layout)
    if "optimizer" in meta:
        missing = [f for f in RESUME_FIELDS if f not in meta]
        if missing:
            refuse(missing[0], "missing; a training checkpoint needs it to resume exactly")
        _check_optimizer(refuse, meta["optimizer"], layout)
        _check_rng(refuse, meta["rng"])
    elif any(name.startswith("optim.") for name in layout):
        refuse("optimizer", "missing, but the file holds optim.* tensors")
    return config


def ema_decay_of_key(key: str) -> float | None:
    """D of a key ``ema@D.<name>`` (an average of decay D besides the first): the shortest prefix
    before a dot that is a number in (0, 1).

    The shortest is the right one: a float's repr in (0, 1) has no proper prefix ending at a dot that
    is itself in (0, 1) ("0.999" -> "0"; "1.5e-05" -> "1").
    """
    if not key.startswith("ema@"):
        return None
    rest = key[len("ema@"):]
    for i, ch in enumerate(rest):
        if ch == ".":
            try:
                d = float(rest[:i])
            except ValueError:
                continue
            if 0.0 < d < 1.0:
                return d
    return None


def weight_group(name: str) -> tuple[str, str] | None:
    """(group, weight name) of a tensor of weights: ``model``, ``ema``, ``ema@D`` (several EMAs) or
    ``phema.I`` (post-hoc EMA profiles); None for any other tensor."""
    decay = ema_decay_of_key(name)
    if decay is not None:
        prefix = f"ema@{name[len('ema@'):].split('.', 1)[0]}"
        while ema_decay_of_key(prefix + ".x") != decay:          # the decay's own dots: "ema@0.999"
            prefix += "." + name[len(prefix) + 1:].split(".", 1)[0]
        return prefix, name[len(prefix) + 1:]
    head, _, rest = name.partition(".")
    if head == "phema" and rest.partition(".")[0].isdigit() and "." in rest:
        index, _, weight = rest.partition(".")
        return f"phema.{index}", weight
    if head in ("model", "ema") and rest:
        return head, rest
    return None


def _check_tensor_names(refuse, layout: dict) -> None:
    for name in sorted(layout):
        if weight_group(name) is None and (name.split(".", 1)[0] not in PREFIXES or "." not in name):
            refuse("tensors", f"{name!r} is none of {', '.join(p + '.*' for p in PREFIXES)}, ema@D.* or phema.I.*")


def _check_weights(refuse, layout: dict) -> None:
    """model.* and every average (ema.*, ema@D.*, phema.I.*) float32, with the same names and shapes."""
    groups: dict[str, dict] = {"model": {}, "ema": {}}
    for key, value in layout.items():
        found = weight_group(key)
        if found:
            groups.setdefault(found[0], {})[found[1]] = value
    for prefix, group in groups.items():
        for name, (dtype, _) in sorted(group.items()):
            if dtype != WEIGHT_DTYPE:
                refuse("tensors", f"{prefix}.{name} is {dtype}, but weights are stored as {WEIGHT_DTYPE}")
    if not groups["ema"]:
        refuse("tensors", "no ema.* weights")
    reference_name = "model" if groups["model"] else "ema"
    reference = groups[reference_name]
    for prefix, group in groups.items():
        if prefix == reference_name or (prefix == "model" and not group):
            continue
        if set(group) != set(reference):
            odd = sorted(set(group) ^ set(reference))[0]
            refuse("tensors", f"{reference_name}.* and {prefix}.* hold different tensors ({odd} is in one only)")
        for name in sorted(group):
            if group[name][1] != reference[name][1]:
                refuse("tensors", f"{prefix}.{name} has shape {list(group[name][1])}, "
                                  f"{reference_name}.{name} {list(reference[name][1])}")


def _check_counts(refuse, meta: dict, step: int) -> None:
    """The counters of the run, each an integer in range and consistent with ``step``."""
    if "ema_updates" in meta:
        _int_in(refuse, "ema_updates", meta["ema_updates"], 0, MAX_COUNT)
    global_batch = None
    if "global_batch" in meta:
        global_batch = _int_in(refuse, "global_batch", meta["global_batch"], 1, MAX_BATCH * MAX_BATCH)
    if "world_size" in meta:
        _int_in(refuse, "world_size", meta["world_size"], 1, MAX_BATCH)
    if "num_images" in meta:
        _int_in(refuse, "num_images", meta["num_images"], 0, 2 ** 62)
    if "data_position" in meta:
        position = _int_in(refuse, "data_position", meta["data_position"], 0, 2 ** 62)
        if global_batch is not None and position != step * global_batch:
            refuse("data_position", f"{position:,} is not step x global_batch = {step * global_batch:,}")
    if "counters" in meta:
        counters = meta["counters"]
        if not isinstance(counters, dict) or set(counters) != set(COUNTERS):
            refuse("counters", f"expected an object with exactly {', '.join(COUNTERS)}")
        for key in COUNTERS:
            _int_in(refuse, f"counters.{key}", counters[key], 0, MAX_COUNT)
        if counters["step"] != step:
            refuse("counters.step", f"{counters['step']} differs from the checkpoint's step {step}")


def _check_sequence_config(refuse, config: dict) -> None:
    """``unet1d`` (a :class:`~ddpm.models.unet1d.Unet1DConfig`), ``seq_length`` and ``diffusion``."""
    from .models.unet1d import Unet1DConfig   # here: the 1D network is read only for these checkpoints

    if set(config) != {"unet1d", "seq_length", "diffusion"}:
        refuse("config", "a sequence model's configuration holds exactly unet1d, seq_length and diffusion")
    _int_in(refuse, "config.seq_length", config["seq_length"], 1, MAX_COUNT)
    for name, cls in (("unet1d", Unet1DConfig), ("diffusion", DiffusionConfig)):
        if not isinstance(config[name], dict):
            refuse(f"config.{name}", "expected an object")
        try:
            cls(**config[name])
        except (ConfigError, TypeError, ValueError) as exc:
            refuse(f"config.{name}", " ".join(str(exc).split()))


def _check_extras(refuse, meta: dict, config: RunConfig) -> None:
    """Optional entries read by some commands: the scaler, the best score, class names, the dataset, the import."""
    scaler = meta.get("scaler")
    if scaler:                          # a disabled GradScaler saves {}; an enabled one all of SCALER
        if not isinstance(scaler, dict) or set(scaler) != set(SCALER) or not all(map(_is_number, scaler.values())):
            refuse("scaler", f"expected null or an object of finite numbers {', '.join(SCALER)}")
        if not (scaler["scale"] > 0 and scaler["growth_factor"] > 1 and 0 < scaler["backoff_factor"] < 1):
            refuse("scaler", "the scale must be positive, the growth factor above 1, the backoff factor in (0, 1)")
        _int_in(refuse, "scaler.growth_interval", scaler["growth_interval"], 1, MAX_COUNT)
        _int_in(refuse, "scaler._growth_tracker", scaler["_growth_tracker"], 0, MAX_COUNT)
    best = meta.get("best")
    if best is not None and not (isinstance(best, dict) and isinstance(best.get("metric"), str)
                                 and _is_number(best.get("value")) and _is_int(best.get("step"))):
        refuse("best", "expected null or an object with a metric name, a finite value and a step")
    names = meta.get("class_names")
    if names is not None:
        count = config.model.num_classes
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names) and len(names) == count):
            refuse("class_names", f"expected {count} strings, one per class of the model")
    if "dataset" in meta and not isinstance(meta["dataset"], str):
        refuse("dataset", f"{meta['dataset']!r} (expected a string)")
    imported = meta.get("imported_from")
    if imported is not None and not (isinstance(imported, dict)
                                     and all(isinstance(v, str) or v is None for v in imported.values())):
        refuse("imported_from", "expected null or an object of strings (the format and folder imported)")


def _check_averages(refuse, meta: dict, layout: dict) -> None:
    """``ema_decays``: the decay of ema.* then one per ema@D.* group, each in [0, 1], none twice;
    ``ema_profiles``: one sigma_rel in (0, 1 / (2 sqrt 3)) per phema.I.* group (EDM2 Eq. 123)."""
    groups = {g for name in layout if (found := weight_group(name)) for g in (found[0],)}
    decays = meta.get("ema_decays")
    if decays is not None:
        if not (isinstance(decays, list) and decays and all(_is_number(d) and 0 <= d <= 1 for d in decays)
                and len(set(decays)) == len(decays)):
            refuse("ema_decays", "expected a list of distinct numbers in [0, 1], the first that of ema.*")
        held = sorted(ema_decay_of_key(g + ".x") for g in groups if g.startswith("ema@"))
        if held != sorted(float(d) for d in decays[1:]):
            refuse("ema_decays", f"{decays[1:]} differ from the ema@D.* tensors' decays {held}")
    profiles = meta.get("ema_profiles")
    phema = sorted(g for g in groups if g.startswith("phema."))
    if profiles is not None:
        if not (isinstance(profiles, list) and all(_is_number(p) and 0 < p < 1 / (2 * math.sqrt(3)) for p in profiles)):
            refuse("ema_profiles", "expected a list of sigma_rel numbers in (0, 0.2887)")
        if phema and len(phema) != len(profiles):
            refuse("ema_profiles", f"{len(profiles)} profile(s), but the file holds {len(phema)} phema.I.* group(s)")
    elif phema:
        refuse("ema_profiles", "missing, but the file holds phema.I.* tensors")


def _check_optimizer(refuse, info, layout: dict) -> None:
    """Adam's state: parameter groups of known parameter indices and the optim.<index>.<key> tensors."""
    if not isinstance(info, dict) or not isinstance(info.get("param_groups"), list) or not info["param_groups"]:
        refuse("optimizer", "expected an object with a non-empty list of param_groups")
    params: list[int] = []
    for i, group in enumerate(info["param_groups"]):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            refuse(f"optimizer.param_groups[{i}]", "expected an object with a list of params")
        if not all(_is_int(p) and p >= 0 for p in group["params"]):
            refuse(f"optimizer.param_groups[{i}].params", "expected parameter indices (integers from 0)")
        for key in ("lr", "eps", "weight_decay"):
            if key in group and not (_is_number(group[key]) and group[key] >= 0):
                refuse(f"optimizer.param_groups[{i}].{key}", f"{group[key]!r} (expected a finite number >= 0)")
        if "betas" in group and not (isinstance(group["betas"], list) and len(group["betas"]) == 2
                                     and all(_is_number(b) and 0 <= b < 1 for b in group["betas"])):
            refuse(f"optimizer.param_groups[{i}].betas", f"{group['betas']!r} (expected two numbers in [0, 1))")
        params += group["params"]
    weights = sum(1 for k in layout if k.startswith("model."))      # parameters, and any buffers
    if len(set(params)) != len(params) or (weights and max(params, default=0) >= weights):
        refuse("optimizer.param_groups", f"their params name {len(params)} parameter(s) (indices up to "
                                         f"{max(params, default=0)}), the model has {weights} tensors")
    scalars = info.get("scalars", {})
    if not isinstance(scalars, dict):
        refuse("optimizer.scalars", "expected an object")
    for key, value in scalars.items():
        idx = key.split(".", 1)[0]
        if not (idx.isdigit() and int(idx) in params and "." in key and _is_number(value)):
            refuse(f"optimizer.scalars.{key}", f"{value!r} (expected a finite number for a known parameter)")
    for name in sorted(k for k in layout if k.startswith("optim.")):
        m = _OPTIM_NAME.match(name)
        if m is None or int(m.group(1)) not in params:
            refuse("tensors", f"{name} belongs to no parameter of the optimizer's param_groups")


def _check_rng(refuse, rng) -> None:
    """The global RNG states saved by training (Python, NumPy, torch CPU, CUDA)."""
    if not isinstance(rng, dict) or not {"python", "numpy", "torch"} <= set(rng):
        refuse("rng", "expected an object with python, numpy and torch states")
    py = rng["python"]
    if not (isinstance(py, list) and len(py) == 3 and _is_int(py[0])
            and (py[2] is None or _is_number(py[2]))):
        refuse("rng.python", "expected [version, state, gauss]")
    _int_list(refuse, "rng.python", py[1][:-1] if isinstance(py[1], list) else None, _MT_WORDS, 2 ** 32 - 1)
    if not (_is_int(py[1][-1]) and 0 <= py[1][-1] <= _MT_WORDS):
        refuse("rng.python", "the position is not from 0 to 624")
    np_state = rng["numpy"]
    if not (isinstance(np_state, list) and len(np_state) == 5 and np_state[0] == "MT19937"):
        refuse("rng.numpy", "expected ['MT19937', keys, position, has_gauss, cached_gaussian]")
    _int_list(refuse, "rng.numpy", np_state[1], _MT_WORDS, 2 ** 32 - 1)
    if not (_is_number(np_state[2]) and 0 <= np_state[2] <= _MT_WORDS and float(np_state[2]).is_integer()
            and np_state[3] in (0, 1) and _is_number(np_state[4])):
        refuse("rng.numpy", "the position, has_gauss or cached value is out of range")
    _int_list(refuse, "rng.torch", rng["torch"], _TORCH_RNG_BYTES, 255)
    cuda = rng.get("cuda", [])
    if not isinstance(cuda, list) or not all(isinstance(s, list) and all(_is_int(x) and 0 <= x <= 255 for x in s)
                                             for s in cuda):
        refuse("rng.cuda", "expected a list of byte lists")
