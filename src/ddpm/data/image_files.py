"""Image files: finding them in a folder, decoding one, resizing and converting channels, and the
memory a folder needs once decoded (read from file headers, before any decoding)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import DataError
from .image_data import MODE_FOR_CHANNELS, ImageData

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Folder images in these modes load as one channel when ``channels`` is None.
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
# Grey modes with more than 8 bits per pixel, which Pillow's "L" conversion would clip.
HIGH_DEPTH_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")

_BICUBIC = getattr(Image, "Resampling", Image).BICUBIC  # Image.Resampling exists from Pillow 9.1
_LUMA_CHUNK = 4096  # images per chunk when converting RGB to grey, to bound the uint32 scratch
HEADER_SAMPLE = 32             # folder files whose headers estimate the decoded size


def find_image_files(root: Path) -> list[Path]:
    paths = [path for path in root.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()]
    if not paths:
        raise DataError(f"{root} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return sorted(paths, key=lambda path: path.relative_to(root).parts)


def class_labels(root: Path, paths: list[Path]) -> tuple[np.ndarray | None, list[str] | None]:
    """Labels from the first folder under ``root``; none if any image lies directly in ``root``."""
    first_parts = [path.relative_to(root).parts for path in paths]
    if any(len(parts) == 1 for parts in first_parts):
        return None, None
    class_names = sorted({parts[0] for parts in first_parts})
    index = {name: i for i, name in enumerate(class_names)}
    return np.array([index[parts[0]] for parts in first_parts], dtype=np.int64), class_names


def load_image_file(path: Path, channels: int | None) -> Image.Image:
    """Decode one image (EXIF orientation applied) into mode L, RGB or RGBA.

    With ``channels`` None the mode is L for grey images and RGB otherwise.
    """
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
        return convert_image(image, channels, path)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot decode image file {path}: it is corrupt or not an image Pillow can read") from exc


def convert_image(image: Image.Image, channels: int | None, where) -> Image.Image:
    """A decoded image in mode L, RGB or RGBA (``channels`` None: L for grey images, else RGB);
    ``where`` names the image in errors."""
    if image.mode in HIGH_DEPTH_MODES:
        image = Image.fromarray(_high_depth_to_uint8(np.asarray(image), image.mode, where))
    target_mode = MODE_FOR_CHANNELS[channels] if channels else ("L" if image.mode in GREY_MODES else "RGB")
    return image.convert(target_mode)


def _high_depth_to_uint8(pixels: np.ndarray, mode: str, path: Path) -> np.ndarray:
    """16-bit grey is scaled to 0..255; 32-bit int / float grey must already lie in 0..255 (and be finite:
    NaN passes every comparison, and would become 0 in the cast)."""
    if mode.startswith("I;16"):
        return ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        bad = int(pixels.size - np.isfinite(pixels).sum())
        raise DataError(f"image {path} (mode {mode}) has {bad} non-finite pixel(s) (NaN or inf); "
                        "replace them, or convert the image to 8-bit first")
    if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
        raise DataError(f"image {path} (mode {mode}) has values outside 0..255; convert it to 8-bit first")
    return np.rint(pixels).astype(np.uint8)


def image_to_array(image: Image.Image, size: tuple[int, int] | None) -> np.ndarray:
    """Optionally resize + center-crop, then return uint8 [H, W, C]."""
    if size is not None:
        image = _cover_and_center_crop(image, size)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def check_same_size(root: Path, paths: list[Path], arrays: list[np.ndarray]) -> None:
    first_shape = arrays[0].shape[:2]
    for path, array in zip(paths, arrays):
        if array.shape[:2] != first_shape:
            raise DataError(f"images in {root} differ in size ({paths[0].name} is {_format_size(first_shape)}, "
                            f"{path.name} is {_format_size(array.shape[:2])}); pass --image-size to resize them")


def _format_size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]} (HxW)"


# ----------------------------------------------------------------------------- resizing and channels

def _cover_and_center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale (bicubic) so the image covers ``size`` = (H, W), then crop its center to exactly that."""
    height, width = size
    scale = max(height / image.height, width / image.width)
    new_width = max(width, round(image.width * scale))
    new_height = max(height, round(image.height * scale))
    if (new_width, new_height) != image.size:
        image = image.resize((new_width, new_height), _BICUBIC)
    left = (new_width - width) // 2
    top = (new_height - height) // 2
    return image.crop((left, top, left + width, top + height))


def resize_and_convert(dataset: ImageData, size: tuple[int, int] | None, channels: int | None) -> ImageData:
    """Apply ``image_size`` and ``channels`` to an in-memory dataset, image by image, in uint8."""
    images = dataset.images
    if size is not None and images.shape[1:3] != size:
        images = _resize_images(images, size)
    if channels is not None and images.shape[-1] != channels:
        images = _convert_channels(images, channels)
    return replace(dataset, images=images)


def _resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    num_channels = images.shape[-1]
    resized = np.empty((len(images), *size, num_channels), dtype=np.uint8)
    for i, pixels in enumerate(images):
        image = Image.fromarray(pixels[..., 0] if num_channels == 1 else pixels)
        resized[i] = np.asarray(_cover_and_center_crop(image, size)).reshape(*size, num_channels)
    return resized


def _convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """1 <-> 3 <-> 4 channels: grey repeats, colour to grey is luma, alpha dropped or set to 255."""
    if channels == 1:
        return _luma(images[..., :3])
    rgb = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images[..., :3]
    if channels == 3:
        return np.ascontiguousarray(rgb)
    alpha = np.full((*images.shape[:-1], 1), 255, dtype=np.uint8)
    return np.concatenate([rgb, alpha], axis=-1)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, L = R 299/1000 + G 587/1000 + B 114/1000, in Pillow's fixed point."""
    grey = np.empty((*rgb.shape[:-1], 1), dtype=np.uint8)
    for start in range(0, len(rgb), _LUMA_CHUNK):
        block = rgb[start:start + _LUMA_CHUNK].astype(np.uint32)
        weighted = block[..., 0] * 19595 + block[..., 1] * 38470 + block[..., 2] * 7471 + 0x8000
        grey[start:start + _LUMA_CHUNK, ..., 0] = weighted >> 16
    return grey


def read_header(path: Path) -> tuple[str, tuple[int, int]] | DataError:
    """(mode, (height, width)) from the file's header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.mode, (image.height, image.width)
    except (OSError, ValueError, Image.DecompressionBombError):
        return DataError(f"cannot decode image file {path}: it is corrupt or not an image Pillow can read")



# ----------------------------------------------------------------------------- memory check for folders

def available_memory() -> int | None:
    """Bytes of memory available to a new allocation: MemAvailable from /proc/meminfo, else None."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_folder_bytes(paths: list[Path], size: tuple[int, int] | None, channels: int | None) -> int:
    """Decoded uint8 bytes of a folder's images, from the headers of an evenly spaced sample of files."""
    sample = [paths[i] for i in np.linspace(0, len(paths) - 1, min(HEADER_SAMPLE, len(paths))).astype(int)]
    headers = [header for header in map(read_header, sample) if not isinstance(header, DataError)]
    if size is not None:
        pixels = size[0] * size[1]
    else:
        pixels = int(np.mean([h * w for _, (h, w) in headers])) if headers else 0
    if channels is None:
        channels = 1 if headers and all(mode in GREY_MODES for mode, _ in headers) else 3
    return len(paths) * pixels * channels


def check_folder_fits_in_memory(root: Path, paths: list[Path], size, channels) -> None:
    """Refuse, before decoding, a folder whose decoded images would not fit in the available memory."""
    available = available_memory()
    if available is None:
        return
    estimate = estimate_folder_bytes(paths, size, channels)
    if estimate > available:
        raise DataError(f"{root}: its {len(paths)} images decode to about {_gigabytes(estimate)}, more than the "
                        f"{_gigabytes(available)} of memory available; prepare it once and train on the "
                        f"prepared copy: ddpm prepare --data {root} --out DATASET_DIR "
                        f"[--image-size N --channels C], then --data DATASET_DIR")


def _gigabytes(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB"
