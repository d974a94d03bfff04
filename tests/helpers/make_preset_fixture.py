"""Write ``tests/fixtures/preset_outputs.json``: what every preset's network computes, at tiny width.

The file pins the architecture that checkpoints written so far rely on: for each preset (at
``dim=16``, ``norm_groups=8``, its own image size and channels) the configuration as a run's
``config.json`` stores it, every weight's name and shape, and the network's output on fixed
weights and inputs. It was written with the code from before attention was placed by level
(configurations then named the feature-map sizes, ``attention_resolutions``);
``tests/test_own_images.py`` checks that today's code builds and computes the same.

    .venv/bin/python tests/helpers/make_preset_fixture.py   # rewrites the file
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ddpm.models import PRESETS, Unet, UnetConfig, preset_config

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "preset_outputs.json"
TINY = dict(dim=16, norm_groups=8)
PICKED = 64                      # output values kept, evenly spread over the flattened output


def seeded_unet(config_dict: dict) -> Unet:
    """The network of ``config_dict`` with reproducible non-zero weights everywhere."""
    torch.manual_seed(0)
    model = Unet(UnetConfig.from_dict(config_dict))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                 # the zero-initialised last layers, so every path carries signal
        for m in model.modules():
            if getattr(m, "zero_init", False):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1)
    return model.eval()


def fixed_input(config_dict: dict) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = config_dict["image_size"]
    x = torch.randn(2, config_dict["channels"], h, w, generator=torch.Generator().manual_seed(2))
    return x, torch.tensor([3, 600])


def picked(out: torch.Tensor) -> list[float]:
    flat = out.flatten()
    return flat[torch.linspace(0, flat.numel() - 1, PICKED).long()].tolist()


def describe(name: str) -> dict:
    config = preset_config(name, **TINY).to_dict()
    model = seeded_unet(config)
    x, t = fixed_input(config)
    with torch.no_grad():
        out = model(x, t)
    return {"config": config, "weights": [f"{k} {list(v.shape)}" for k, v in model.state_dict().items()],
            "output_sum": out.double().sum().item(), "output_abs_sum": out.double().abs().sum().item(),
            "output_picked": picked(out)}


def main() -> None:
    torch.set_num_threads(1)
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps({name: describe(name) for name in PRESETS}, indent=1) + "\n")
    print(f"wrote {FIXTURE}")


if __name__ == "__main__":
    main()
