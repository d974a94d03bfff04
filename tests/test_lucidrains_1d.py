"""lucidrains' 1D family (Unet1D, GaussianDiffusion1D, Trainer1D, Dataset1D) on the project's 1D U-Net and
diffusion maths over sequences [B, C, L]."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpm.compat.lucidrains import ArgumentError, Dataset1D, GaussianDiffusion1D, Trainer1D, Unet1D
from ddpm.diffusion import q_sample
from ddpm.pixels import to_model_range
from ddpm.models.unet1d import Unet1D as NativeUnet1D


def test_the_readme_1d_example_runs_with_the_import_changed(tmp_path):
    # lucidrains' README 1D example, at tiny sizes (their dim 64, seq_length 128, 700,000 steps).
    torch.manual_seed(0)
    model = Unet1D(dim=8, dim_mults=(1, 2), channels=4)
    diffusion = GaussianDiffusion1D(model, seq_length=16, timesteps=30, objective='pred_v')
    training_seq = torch.rand(8, 4, 16)
    loss = diffusion(training_seq)
    loss.backward()
    dataset = Dataset1D(training_seq)
    trainer = Trainer1D(diffusion, dataset=dataset, train_batch_size=4, train_lr=8e-5, train_num_steps=2,
                        gradient_accumulate_every=2, ema_decay=0.995, amp=True, save_and_sample_every=2,
                        num_samples=3, results_folder=tmp_path / "results")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    sampled_seq = diffusion.sample(batch_size=4, progress=False)
    assert sampled_seq.shape == (4, 4, 16)
    assert 0.0 <= float(sampled_seq.min()) and float(sampled_seq.max()) <= 1.0
    # The user's model was trained in place, and milestone 1 holds its weights and the EMA's samples.
    assert not torch.equal(before["conv_in.weight"], model.conv_in.weight)
    assert np.load(tmp_path / "results" / "sample-1.npz")["samples"].shape == (3, 4, 16)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    trainer.load(1)
    assert trainer.step == 2 and all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


def test_the_1d_loss_is_l_simple_on_sequences():
    torch.manual_seed(1)
    model = Unet1D(dim=8, dim_mults=(1, 2), channels=2)
    with torch.no_grad():
        model.conv_out.weight.normal_()                 # a network whose output is not zero
    diffusion = GaussianDiffusion1D(model, seq_length=8, timesteps=40)       # pred_noise, cosine: as there
    x = torch.rand(3, 2, 8)
    t, noise = torch.tensor([0, 17, 39]), torch.randn(3, 2, 8)
    x0 = to_model_range(x)
    x_t = q_sample(diffusion.schedule, x0, t, noise)
    expected = (model(x_t, t) - noise).pow(2).mean()    # Eq. 14 over [B, C, L]
    torch.testing.assert_close(diffusion(x, t=t, noise=noise), expected)
    assert diffusion.config.schedule == "cosine" and diffusion.config.objective == "eps"


def test_the_1d_unet_has_the_2d_structure_and_checks_its_input():
    net = NativeUnet1D(channels=3, dim=16, dim_mults=(1, 2, 4), attention_levels=(1,), norm_groups=8)
    x, t = torch.randn(2, 3, 12), torch.tensor([3, 999])
    assert net(x, t).shape == (2, 3, 12)
    assert torch.count_nonzero(net(x, t)) == 0          # the last layer starts at zero, as in the paper's code
    kinds = {type(m).__name__ for m in net.modules()}
    assert {"ResBlock1D", "AttentionBlock1D", "Downsample1D", "Upsample1D", "GroupNorm"} <= kinds
    with pytest.raises(ValueError, match="multiple of 4"):
        net(torch.randn(1, 3, 10), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\[B, 3, L\]"):
        net(torch.randn(1, 3, 8, 8), torch.tensor([0]))


def test_self_condition_and_learned_variance_double_the_channels():
    model = Unet1D(dim=8, dim_mults=(1, 2), channels=2, self_condition=True, learned_variance=True)
    assert model(torch.randn(1, 4, 8), torch.tensor([1])).shape == (1, 4, 8)
    diffusion = GaussianDiffusion1D(model, seq_length=8, timesteps=30)
    assert diffusion.self_condition and diffusion.config.variance == "learned-range"
    assert diffusion.sample(batch_size=2, progress=False).shape == (2, 2, 8)


@pytest.mark.parametrize("options, phrase", [
    ({"channel_first": False}, "channel_first=False"),
    ({"channels": 5}, "channels=5"),
])
def test_1d_arguments_without_an_equivalent_are_one_line_errors(options, phrase):
    with pytest.raises(ArgumentError, match=phrase):
        GaussianDiffusion1D(Unet1D(dim=8, dim_mults=(1, 2), channels=2), seq_length=8, **options)


@pytest.mark.parametrize("options, phrase", [
    ({"attn_dim_head": 64}, "attn_dim_head=64.*nearest: attn_heads"),
    ({"learned_sinusoidal_cond": True}, "learned_sinusoidal_cond=True"),
    ({"dim_mult": (1, 2)}, "unexpected argument 'dim_mult'; did you mean 'dim_mults'"),
])
def test_1d_unet_arguments_without_an_equivalent_are_one_line_errors(options, phrase):
    with pytest.raises(ArgumentError, match=phrase):
        Unet1D(dim=8, **options)
    Unet1D(dim=8, dim_mults=(1, 2), attn_dim_head=32, learned_sinusoidal_cond=False)    # their defaults: accepted
