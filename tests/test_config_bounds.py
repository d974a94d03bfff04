"""Bounds on the configuration: the edges accepted, one past them refused; the memory estimate."""

from __future__ import annotations

import math

import pytest

import ddpm.build as build_module
import ddpm.device as device_module
from ddpm.build import build_model, model_bytes
from ddpm.config import (MAX_DIM, MAX_IMAGE_SIDE, MAX_TIMESTEPS, SEED_LIMIT, DataConfig, DiffusionConfig, RunConfig,
                         TrainConfig, check_model_options)
from ddpm.estimates import check_training_memory, training_bytes_at_least
from ddpm.resolve import load_toml
from ddpm.errors import ConfigError
from ddpm.models import preset_config


@pytest.mark.parametrize("make, good, bad", [
    (lambda v: DiffusionConfig(timesteps=v), [2, MAX_TIMESTEPS], [1, MAX_TIMESTEPS + 1, 2.0, True]),
    (lambda v: DataConfig(image_size=v), [1, MAX_IMAGE_SIDE, (1, MAX_IMAGE_SIDE)], [0, MAX_IMAGE_SIDE + 1, (8, 0)]),
    (lambda v: TrainConfig(seed=v), [0, SEED_LIMIT - 1], [-1, SEED_LIMIT, 2 ** 70, 1.0]),
    (lambda v: check_model_options({"dim": v}), [1, MAX_DIM], [0, MAX_DIM + 1, 2 ** 30, "8"]),
    (lambda v: check_model_options({"image_size": v}), [8, [8, MAX_IMAGE_SIDE]], [[60_000, 8], [8, 8, 8]]),
])
def test_integer_bounds_accept_their_edges_and_refuse_one_past(make, good, bad):
    for value in good:
        make(value)
    for value in bad:
        with pytest.raises(ConfigError, match="from|must be"):
            make(value)


@pytest.mark.parametrize("make", [
    lambda v: TrainConfig(lr=v), lambda v: TrainConfig(grad_clip=v), lambda v: TrainConfig(weight_decay=v),
    lambda v: TrainConfig(ema_decay=v), lambda v: TrainConfig(time_limit=v), lambda v: DiffusionConfig(min_snr_gamma=v),
    lambda v: DiffusionConfig(offset_noise=v),
    lambda v: DiffusionConfig(loss="hybrid", variance="learned-range", vlb_weight=v),
    lambda v: check_model_options({"norm_eps": v}),
])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_numbers_are_refused(make, value):
    with pytest.raises(ConfigError, match="finite"):
        make(value)


def test_a_checkpoint_header_out_of_bounds_is_refused_before_a_model_exists(monkeypatch):
    built = []
    monkeypatch.setattr("ddpm.models.unet.UnetConfig.validate", lambda self: built.append(self))
    d = RunConfig.for_preset("digits").to_dict()
    for section, key, value in (("model", "dim", 2 ** 30), ("model", "dim_mults", [1] * 20),
                                ("diffusion", "timesteps", 10 ** 10), ("model", "image_size", [8, 10 ** 5])):
        bad = {**d, section: {**d[section], key: value}}
        with pytest.raises(ConfigError, match=key):
            RunConfig.from_dict(bad)
    assert all(c.dim != 2 ** 30 for c in built)


def test_model_bytes_counts_the_parameters_exactly():
    for preset in ("digits", "mnist", "cifar10"):
        config = RunConfig.for_preset(preset)
        assert model_bytes(config) == 4 * build_model(config).num_parameters()


def test_training_memory_lower_bound_and_its_check(monkeypatch):
    config = RunConfig.for_preset("digits")
    m, tc = config.model, config.train
    h, w = m.image_size
    activations = 4 * tc.batch_size * m.dim * m.dim_mults[0] * h * w * (2 * m.num_res_blocks + 1)
    assert training_bytes_at_least(config) == 5 * model_bytes(config) + activations
    check_training_memory(config, "cpu")                            # a digits run fits any machine
    monkeypatch.setattr(device_module, "device_bytes", lambda device: training_bytes_at_least(config) - 1)
    with pytest.raises(ConfigError, match="training this model takes at least .* GiB, more than the .* of the cpu"):
        check_training_memory(config, "cpu")


def test_a_model_too_big_for_the_machine_is_refused_before_it_is_built(monkeypatch):
    built, real = [], build_module._unet

    def spy(config):
        model = real(config)
        built.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(build_module, "_unet", spy)
    monkeypatch.setattr(device_module, "device_bytes", lambda device: 2 ** 30)
    big = RunConfig(preset="custom", model=preset_config("cifar10", dim=512))    # about 2.3 GiB of weights
    with pytest.raises(ConfigError, match="this model's weights take at least"):
        build_model(big)
    assert built == ["meta"]                         # counted without memory, never allocated


@pytest.mark.parametrize("content, message", [
    (b"\x00\x01binary", "is a binary file"),
    ("[train]\nsteps = 3 # \xe9\n".encode("latin-1"), "is not UTF-8 text"),
    (b"[train]\nbogus = 1\n", "unknown option\\(s\\) 'bogus' in \\[train\\]; allowed: steps, batch_size"),
    (b"[model]\nwidth = 1\n", "unknown option\\(s\\) 'width' in \\[model\\]; allowed: image_size, channels, dim"),
    (b"[diffusion]\nT = 10\n", "in \\[diffusion\\]; allowed: timesteps"),
    (b"[model]\ndim = 100000\n", "model dim must be an integer from 1 to 4,096"),
])
def test_toml_files_are_refused_in_one_line(tmp_path, content, message):
    path = tmp_path / "run.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as info:
        load_toml(path)
    assert "\n" not in str(info.value)


def test_the_option_parsers_bound_t_and_seeds_like_the_configuration():
    import argparse

    from ddpm.cli.arg_types import seed_type as _seed, timesteps_type as _timesteps

    assert _timesteps("2") == 2 and _timesteps(str(MAX_TIMESTEPS)) == MAX_TIMESTEPS
    assert _seed("0") == 0 and _seed(str(SEED_LIMIT - 1)) == SEED_LIMIT - 1
    for parse, text in ((_timesteps, "1"), (_timesteps, str(MAX_TIMESTEPS + 1)), (_seed, "-1"),
                        (_seed, str(SEED_LIMIT)), (_seed, "1e3")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
