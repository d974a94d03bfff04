"""A folder of real RGB photos for tests: crops of the two photos scikit-learn ships.

``sklearn.datasets.load_sample_images`` holds ``china.jpg`` and ``flower.jpg`` (427 x 640);
:func:`make_photo_folder` saves random 96 x 128 crops of each as JPEG files in one class
subfolder per photo (``china/``, ``flower/``), as a user's own folder of photos would be.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_photo_folder(root: Path, crops_per_photo: int = 24, seed: int = 0) -> Path:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    rng = np.random.default_rng(seed)
    for path, image in zip(sample.filenames, sample.images):
        folder = root / Path(path).stem
        folder.mkdir(parents=True)
        for k in range(crops_per_photo):
            top, left = rng.integers(0, image.shape[0] - 96), rng.integers(0, image.shape[1] - 128)
            Image.fromarray(image[top:top + 96, left:left + 128]).save(folder / f"{k:02d}.jpg", quality=90)
    return root
