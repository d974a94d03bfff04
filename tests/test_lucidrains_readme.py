"""Every Python example of lucidrains' README runs with only its import changed (tiny sizes here), and the
library's other classes either map onto this project's or refuse in one line naming the nearest call."""

from __future__ import annotations

import pytest
import torch

import ddpm
from ddpm.compat import lucidrains
from ddpm.compat.lucidrains import ArgumentError, GaussianDiffusion, LearnedGaussianDiffusion, Unet, XMWrapper
from ddpm.errors import DdpmError


def test_the_xm_example_runs_and_its_loss_is_the_smallest_of_k_candidates():
    torch.manual_seed(0)
    model = Unet(dim=8, dim_mults=(1, 2))
    diffusion = GaussianDiffusion(model, image_size=8, timesteps=50)
    xm = XMWrapper(diffusion, candidates=4)
    calls = []
    real_forward = diffusion.forward

    def spy(images, **kwargs):
        losses = real_forward(images, **kwargs)
        calls.append((kwargs["t"].clone(), losses.detach().clone()))
        return losses

    diffusion.forward = spy
    training_images = torch.rand(3, 3, 8, 8)
    loss = xm(training_images)
    loss.backward()
    (t, per_row), = calls
    # Rows are (image, candidate): each image's 4 candidates share its timestep...
    assert per_row.shape == (12,) and torch.equal(t, t.reshape(3, 4)[:, :1].expand(3, 4).reshape(12))
    # ...draw different noise, and the loss is the mean over images of the smallest candidate.
    assert len(set(per_row.tolist())) == 12
    torch.testing.assert_close(loss.detach(), per_row.reshape(3, 4).amin(dim=1).mean())
    assert xm.sample(batch_size=2, progress=False).shape == (2, 3, 8, 8)


def test_the_readme_trainer_and_unet_examples_import():
    for name in ("Unet", "GaussianDiffusion", "Trainer", "XMWrapper", "Unet1D", "GaussianDiffusion1D", "Trainer1D",
                 "Dataset1D", "LearnedGaussianDiffusion"):
        assert name in lucidrains.__all__ and hasattr(lucidrains, name), name


@pytest.mark.parametrize("name, nearest", [
    ("ContinuousTimeGaussianDiffusion", "timesteps=1000"),
    ("VParamContinuousTimeGaussianDiffusion", "objective='pred_v'"),
    ("WeightedObjectiveGaussianDiffusion", "objective='pred_v'"),
    ("KarrasUnet", "Unet(dim="),
    ("KarrasUnet1D", "Unet1D(dim="),
    ("KarrasUnet3D", "Unet1D"),
    ("InvSqrtDecayLRSched", "--warmup-steps"),
])
def test_classes_without_an_equivalent_refuse_in_one_line_naming_the_nearest_call(name, nearest):
    cls = getattr(lucidrains, name)
    with pytest.raises(ArgumentError) as error:
        cls(Unet(dim=8, dim_mults=(1, 2)), image_size=8)
    message = str(error.value)
    assert isinstance(error.value, DdpmError) and "\n" not in message
    assert message.startswith(f"{name} has no equivalent in ddpm") and nearest in message


def test_loss_type_l2_is_the_loss_and_l1_is_refused():
    model = Unet(dim=8, dim_mults=(1, 2))
    images, t, noise = torch.rand(2, 3, 8, 8), torch.tensor([3, 40]), torch.randn(2, 3, 8, 8)
    old = GaussianDiffusion(model, image_size=8, timesteps=50, loss_type="l2")
    new = GaussianDiffusion(model, image_size=8, timesteps=50)
    torch.testing.assert_close(old(images, t=t, noise=noise), new(images, t=t, noise=noise))
    for loss_type in ("l1", "huber"):
        with pytest.raises(ArgumentError, match=f"loss_type='{loss_type}'.*nearest: loss_type='l2'"):
            GaussianDiffusion(model, image_size=8, loss_type=loss_type)


def test_learned_gaussian_diffusion_trains_the_hybrid_loss_with_its_weight():
    torch.manual_seed(0)
    model = Unet(dim=8, dim_mults=(1, 2), learned_variance=True)
    with torch.no_grad():
        model.conv_out.weight.normal_()
    images, t, noise = torch.rand(2, 3, 8, 8), torch.tensor([3, 40]), torch.randn(2, 3, 8, 8)
    light = LearnedGaussianDiffusion(model, image_size=8, timesteps=50)
    heavy = LearnedGaussianDiffusion(model, vb_loss_weight=1.0, image_size=8, timesteps=50)
    assert (light.config.loss, light.config.variance, light.config.vlb_weight) == ("hybrid", "learned-range", 0.001)
    assert heavy.config.vlb_weight == 1.0
    with torch.no_grad():
        assert float(heavy(images, t=t, noise=noise)) > float(light(images, t=t, noise=noise))
    with pytest.raises(ArgumentError, match="learned_variance=True"):
        LearnedGaussianDiffusion(Unet(dim=8, dim_mults=(1, 2)), image_size=8)


def test_interpolate_mixes_the_two_latents_through_the_projects_interpolation():
    model = Unet(dim=8, dim_mults=(1, 2))
    with torch.no_grad():
        model.conv_out.weight.normal_()
    diffusion = GaussianDiffusion(model, image_size=8, timesteps=50)
    x1, x2 = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)

    def run(a, b, lam):
        torch.manual_seed(5)                           # the same noise for both calls
        return diffusion.interpolate(a, b, t=3, lam=lam)

    out = run(x1, x2, 0.25)
    assert out.shape == (2, 3, 8, 8) and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    torch.testing.assert_close(run(x1, x2, 0.25), run(x2, x1, 0.75))      # lam mixes (1 - lam) x1 + lam x2
    assert not torch.equal(run(x1, x2, 0.0), run(x1, x2, 1.0))
    with pytest.raises(ArgumentError, match="lam must be k / n"):
        diffusion.interpolate(x1, x2, t=3, lam=0.123456)


def test_the_projects_unet_points_lucidrains_arguments_to_the_compatible_class():
    with pytest.raises(TypeError, match=r"lucidrains' argument 'flash_attn'.*from ddpm.compat.lucidrains import Unet"):
        ddpm.Unet(dim=64, dim_mults=(1, 2, 4, 8), flash_attn=True)
    with pytest.raises(TypeError, match="unexpected argument 'dimm'; it takes the UnetConfig fields"):
        ddpm.Unet(dimm=64)
