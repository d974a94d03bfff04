"""Several EMAs at once: each average is bit for bit the training loop's EMA of its decay, the
checkpoint names keep old checkpoints loadable, and ``--weights`` picks the tensors it names."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ddpm.checkpoint import load_checkpoint, load_weights, save_checkpoint
from ddpm.config import RunConfig
from ddpm.ema import EMABank, check_decays, decays_in, ema_prefix, parse_weights, select_weights
from ddpm.errors import CheckpointError, ConfigError
from ddpm.training_state import EMA

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from running_mean import RunningMean  # noqa: E402

CONFIG = RunConfig.for_preset("digits").to_dict()      # a valid configuration (the tensors need not fit it)


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), RunningMean(4), nn.Linear(4, 2))   # parameters and buffers


def train_steps(model: nn.Module, averages: list, steps: int) -> None:
    """Gradient steps on random data (plain SGD, so no optimizer machinery is imported), every average
    updated after each, as the training loop does; the running mean moves too."""
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 3, generator=g)
        model.zero_grad()
        model(x).square().mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.05 * p.grad)
        for a in averages:
            a.update(model)


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("warmup", [True, False])
def test_each_average_is_the_loops_ema_bit_for_bit(warmup):
    decays = (0.9999, 0.99, 0.9)
    model = tiny_model()
    singles = [EMA(model, d, warmup) for d in decays]
    one = EMABank(model, [0.9999], warmup)
    bank = EMABank(model, decays, warmup)
    train_steps(model, [*singles, one, bank], 300)
    assert same_state(one.model, singles[0].model)
    for single, average in zip(singles, bank.models):
        assert same_state(average, single.model)
    assert bank.num_updates == singles[0].num_updates == 300
    assert not same_state(bank.models[1], bank.models[2])     # the decays do differ
    assert torch.equal(bank.models[2][1].running_mean, model[1].running_mean)   # buffers copied


def test_checkpoint_names_and_round_trip(tmp_path):
    model = tiny_model()
    bank = EMABank(model, [0.9999, 0.999, 1.5e-05])
    train_steps(model, [bank], 20)
    tensors = bank.state_tensors()
    names = set(model.state_dict())
    assert {k for k in tensors if k.startswith("ema.")} == {f"ema.{n}" for n in names}   # first: old names
    assert {k for k in tensors if k.startswith("ema@0.999.")} == {f"ema@0.999.{n}" for n in names}
    assert {k for k in tensors if k.startswith("ema@1.5e-05.")} == {f"ema@1.5e-05.{n}" for n in names}
    assert decays_in(tensors, first=0.9999) == [0.9999, 0.999, 1.5e-05]
    path = save_checkpoint(tmp_path / "c.safetensors", {**{f"model.{k}": v for k, v in model.state_dict().items()},
                                                        **tensors}, {"step": 20, "config": CONFIG})
    loaded, _ = load_checkpoint(path)
    again = EMABank(tiny_model(seed=5), [0.9999, 0.999, 1.5e-05])
    again.load_state_tensors(loaded, str(path))
    for a, b in zip(again.models, bank.models):
        assert same_state(a, b)


def test_an_old_checkpoint_loads_into_a_one_decay_bank():
    model = tiny_model()
    old = EMA(model, 0.9999)
    train_steps(model, [old], 15)
    bank = EMABank(tiny_model(seed=3), [0.9999])
    bank.load_state_tensors({f"ema.{k}": v for k, v in old.model.state_dict().items()}, "old.safetensors")
    assert same_state(bank.model, old.model)


def test_key_set_mismatches_are_one_line_errors():
    model = tiny_model()
    two = EMABank(model, [0.9999, 0.999]).state_tensors()
    with pytest.raises(CheckpointError, match=r"^c holds EMA weights for decay\(s\) 0.9999, 0.999; this run keeps "
                                              r"0.9999, 0.99$"):
        EMABank(model, [0.9999, 0.99]).load_state_tensors(two, "c")
    with pytest.raises(CheckpointError, match=r"holds EMA weights for decay\(s\) 0.9999, 0.999; this run keeps 0.9999$"):
        EMABank(model, [0.9999]).load_state_tensors(two, "c")             # a decay the run does not keep
    other = EMABank(nn.Sequential(nn.Linear(3, 5)), [0.9999, 0.999]).state_tensors()
    with pytest.raises(CheckpointError, match="c: the ema.\\* weights do not match the model's architecture"):
        EMABank(model, [0.9999, 0.999]).load_state_tensors(other, "c")


@pytest.mark.parametrize("bad", [-0.5, 1.5, 1.0000001, float("nan"), float("inf"), True, "0.9"])
def test_decays_outside_the_open_unit_interval_are_refused(bad):
    with pytest.raises(ConfigError) as info:
        check_decays([0.9, bad])
    assert str(info.value) == f"EMA decay must be a number in [0, 1]; got {bad!r}"
    with pytest.raises(ConfigError, match="given twice"):
        check_decays([0.9, 0.9])


def test_weights_selection_picks_the_named_tensors(tmp_path):
    model = tiny_model()
    bank = EMABank(model, [0.9999, 0.999])
    train_steps(model, [bank], 30)
    meta = {"step": 30, "config": CONFIG}           # its first decay is the default 0.9999
    path = save_checkpoint(tmp_path / "c.safetensors", {**{f"model.{k}": v for k, v in model.state_dict().items()},
                                                        **bank.state_tensors()}, meta)
    tensors, meta = load_checkpoint(path)
    expected = {"raw": model, "ema": bank.models[0], "ema:0.9999": bank.models[0], "ema:0.999": bank.models[1]}
    for selection, source in expected.items():
        target = tiny_model(seed=9)
        load_weights(target, tensors, select_weights(tensors, meta, selection), meta["path"])
        assert same_state(target, source), selection
    assert select_weights(tensors, {**meta, "ema_decays": [0.999, 0.9999]}, "ema:0.999") == "ema"   # metadata wins
    with pytest.raises(ConfigError) as info:
        select_weights(tensors, meta, "ema:0.99")
    assert str(info.value) == f"{path} holds no EMA weights for decay 0.99 (decays present: 0.9999, 0.999)"


def test_weights_strings():
    assert parse_weights("raw") == ("raw", None)
    assert parse_weights("ema") == ("ema", None)
    assert parse_weights("ema:0.9999") == ("ema", 0.9999)
    assert parse_weights("ema:1e-3") == ("ema", 0.001)
    for bad in ("", "emma", "ema:", "ema:x", "ema:1.5", "ema:-0.1", "raw:0.9", "ema:0.9:0.9"):
        with pytest.raises(ConfigError) as info:
            parse_weights(bad)
        assert str(info.value).startswith("--weights must be raw, ema or ema:DECAY") and "\n" not in str(info.value)
    assert ema_prefix(0.9999, first=True) == "ema" and ema_prefix(0.999, first=False) == "ema@0.999"
