"""Full-reference image quality: PSNR and SSIM of outputs against their targets.

Images are float tensors [B, C, H, W] in [-1, 1] (the data range, 2) or uint8 [B, H, W, C] (255).

* PSNR = 10 log10(range^2 / MSE), per image, over all pixels and channels.
* SSIM (Wang et al. 2004, Eq. 13): local means, variances and covariance under an 11x11 Gaussian
  window of standard deviation 1.5, C1 = (0.01 range)^2, C2 = (0.03 range)^2, averaged over the
  valid windows of each channel and then over channels; per image. Images smaller than the window
  use a window of their smaller side.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

WINDOW = 11
WINDOW_SIGMA = 1.5
K1, K2 = 0.01, 0.03


def _as_float(images: torch.Tensor) -> tuple[torch.Tensor, float]:
    """float64 NCHW and the data range of the input's convention."""
    if images.dtype == torch.uint8:
        return images.permute(0, 3, 1, 2).to(torch.float64), 255.0
    return images.to(torch.float64), 2.0


def psnr(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, one per image (inf for identical images)."""
    x, data_range = _as_float(outputs)
    y, _ = _as_float(targets)
    mse = ((x - y) ** 2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def _gaussian_window(size: int, sigma: float, channels: int) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Structural similarity, one per image (1 for identical images)."""
    x, data_range = _as_float(outputs)
    y, _ = _as_float(targets)
    channels = x.shape[1]
    size = min(WINDOW, x.shape[-2], x.shape[-1])
    window = _gaussian_window(size, WINDOW_SIGMA, channels)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(dim=1)


def summary(values: torch.Tensor) -> dict:
    """Mean and standard error of per-image values (finite ones; inf PSNR counts as identical)."""
    finite = values[torch.isfinite(values)]
    n = len(finite)
    mean = float(finite.mean()) if n else math.inf
    sem = float(finite.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
    return {"mean": mean, "sem": sem, "identical": int(len(values) - n)}
