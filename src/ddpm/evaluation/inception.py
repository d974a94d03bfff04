"""The full 2015 Inception-v3 network, with its 1008-way classifier, for the Inception Score.

Inception-v3 (Szegedy et al. 2016, "Rethinking the Inception Architecture") as TensorFlow released
it on 2015-12-05: the graph behind the Inception Score (Salimans et al. 2016) and FID (Heusel et
al. 2017). The TorchScript file that :class:`~ddpm.evaluation.features.InceptionFeatures` loads
stops at the 2048 pool features; the Inception Score needs the classifier on top of them, so this
module builds the whole network in code and fills it from a weights file in the layout of
``pt_inception-2015-12-05-6726825d.pth``, the state dict that pytorch-fid and torch-fidelity use
(torchvision's Inception-v3 names, 1008 classes, no auxiliary classifier). The file is read with
``torch.load(weights_only=True)``: plain tensors, no code.

The blocks follow the TensorFlow graph where it differs from torchvision's Inception-v3: the
average pools of the mixed blocks leave the zero padding out of the mean (TensorFlow's SAME
pooling), and the last block pools its fourth branch with a max pool.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .features import InceptionPreprocess

__all__ = ["InceptionV3", "INCEPTION_WEIGHTS_FILE", "NUM_INCEPTION_CLASSES", "load_inception_v3",
           "InceptionClassifier"]

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
NUM_INCEPTION_CLASSES = 1008          # the 2015 graph's classifier: 1000 ImageNet classes and 8 unused
POOL_DIM = 2048


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 0.001, as TensorFlow's), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    """3x3 average pool, stride 1, TensorFlow's SAME padding: the padding is not counted in the mean."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b..5d): 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool_same(x))], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b..6e)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c, c, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c, c, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c, c, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c, c, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = layer(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(_avg_pool_same(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with expanded 1x3 / 3x1 outputs (Mixed_7b: average pool; Mixed_7c: max pool, as in the graph)."""

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool_same(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pooled)], 1)


class InceptionV3(nn.Module):
    """The 2015 Inception-v3: [N, 3, 299, 299] in [-1, 1] -> pool features [N, 2048] and logits [N, 1008].

    ``logits`` are fc(pool) without the bias, as the reference Inception Score code computes
    them (Salimans et al. 2016: the pool features times the softmax layer's weight matrix).
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(POOL_DIM, NUM_INCEPTION_CLASSES)

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool = self.pool_features(x)
        return pool, pool @ self.fc.weight.T


def _missing_weights_message() -> str:
    return (f"--metric is needs the full 2015 Inception network with its 1008-way classifier: pass "
            f"--inception-weights {INCEPTION_WEIGHTS_FILE} (the weights pytorch-fid and torch-fidelity use); "
            f"nothing is downloaded")


def load_inception_v3(path: str | os.PathLike | None, *, device: str | torch.device = "cpu") -> InceptionV3:
    """The network filled from a state dict in the layout of ``pt_inception-2015-12-05`` (eval mode).

    Every tensor must be there with its shape (``num_batches_tracked`` of the batch norms may be
    absent); anything else is a clear :class:`ConfigError`, never a traceback.
    """
    if path is None:
        raise ConfigError(_missing_weights_message())
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Inception weights {path} do not exist; {_missing_weights_message()}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:          # pickle, zip and unpickler errors of every kind: one line
        raise ConfigError(f"cannot read Inception weights {path}: {str(exc).strip().splitlines()[0][:200]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"Inception weights {path} are not a state dict of tensors")
    model = InceptionV3()
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unknown = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unknown or wrong:
        first = (f"lacks {missing[0]}" if missing else f"has an unknown tensor {unknown[0]}" if unknown
                 else f"has {wrong[0]} of shape {tuple(state[wrong[0]].shape)}, expected {tuple(expected[wrong[0]].shape)}")
        raise ConfigError(f"Inception weights {path} are not in the layout of {INCEPTION_WEIGHTS_FILE}: "
                          f"the file {first} ({len(missing)} missing, {len(unknown)} unknown, {len(wrong)} misshapen)")
    model.load_state_dict({**expected, **state}, strict=True)
    return model.eval().to(device)


class InceptionClassifier:
    """Class probabilities [N, 1008] of the 2015 Inception-v3 for uint8 images, for the Inception Score.

    Preprocessing is that of the FID features (see :class:`~ddpm.evaluation.features.InceptionFeatures`):
    the same resize mode and input range.
    """

    def __init__(self, path: str | os.PathLike | None, *, device: str | torch.device = "cpu", batch_size: int = 50,
                 resize: str = "tensorflow"):
        self.model = load_inception_v3(path, device=device).to(memory_format=torch.channels_last)
        self.path, self.batch_size = Path(path), batch_size
        self.preprocess = InceptionPreprocess(resize, device=device, channels_last=True)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            _, logits = self.model(self.preprocess(images[i:i + self.batch_size]))
            out.append(F.softmax(logits.double(), dim=1).cpu().numpy())
        return np.concatenate(out)
