"""Decoding images into upright 8-bit RGB, the one input format every later stage assumes, and the
path from a sample's bytes to a model input: timm's eval and train transforms, and the Dataset that
feature extraction and fine-tuning both read images through.

Camera JPEGs (4032x3024, often with an EXIF rotation) are decoded with libjpeg's DCT-domain
downscaling (`draft`) when the caller only needs a small image, which is several times faster than a
full decode followed by a resize. Anything that is not a complete, decodable image of sane size raises
`ImageDecodeError`: a partially decoded picture is never returned.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import Dataset

from .fingerprint import derived_seed
from .sources import Sample, read_bytes

log = logging.getLogger(__name__)

MAX_PIXELS = 200_000_000  # decompression-bomb guard, checked on every call from the header's size


class ImageDecodeError(ValueError):
    """The input is not a complete, decodable image of acceptable size; the message says why."""


def _open(source: bytes | str | Path | Image.Image) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, Path)):
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ImageDecodeError(f"{source}: cannot read the file ({exc})") from exc
    else:
        raise TypeError(f"decode_image takes bytes, a path or a PIL image, not {type(source).__name__}")
    if not data:
        raise ImageDecodeError("empty input (0 bytes)")
    return Image.open(io.BytesIO(data))


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    """16/32-bit integer grayscale (I;16*, I) to 8-bit, scaling the 16-bit range (0..65535 -> 0..255).

    `convert("L")` would clip instead of scale, turning most 16-bit images white."""
    values = np.asarray(image).astype(np.float64)
    scaled = np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def _on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I;16") or mode == "I":
        return _to_8bit_gray(image).convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        return _on_white(image)
    # P, L, 1, CMYK (Adobe-inverted CMYK is undone by Pillow's JPEG reader), YCbCr, F (clipped to 0..255)
    return image.convert("RGB")


def decode_image(
    source: bytes | str | Path | Image.Image,
    *,
    draft_size: int | None = None,
    max_pixels: int = MAX_PIXELS,
) -> Image.Image:
    """Decode to an upright 8-bit RGB image.

    EXIF orientation is applied; alpha (RGBA, LA, palette transparency) is composited on white;
    palette, grayscale, 16-bit and CMYK images are converted to 8-bit RGB. With `draft_size`, a JPEG is
    downscaled in the DCT domain by 1/2, 1/4 or 1/8 before decoding, keeping both sides >= draft_size
    (so the shorter side stays >= draft_size whichever way EXIF rotates it); other formats ignore it.
    Raises ImageDecodeError for empty, truncated, corrupt, non-image or oversized (> max_pixels) input.
    """
    if draft_size is not None and draft_size < 1:
        raise ValueError(f"draft_size must be a positive number of pixels, got {draft_size}")
    try:
        image = _open(source)
        width, height = image.size
        # Our own guard, from the header, before any pixel is decoded: PIL's global
        # Image.MAX_IMAGE_PIXELS may have been disabled by another library.
        if width * height > max_pixels:
            raise ImageDecodeError(f"image too large: {width}x{height} = {width * height} pixels "
                                   f"exceeds the limit of {max_pixels}")
        if draft_size and isinstance(image, ImageFile.ImageFile) and image.format == "JPEG":
            # A square request keeps both sides >= draft_size, so an EXIF rotation cannot shrink
            # the shorter side below it. draft() does nothing once pixels are loaded.
            image.draft("RGB", (draft_size, draft_size))
        image.load()  # force the full decode here, so truncation raises instead of returning grey rows
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image too large: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageDecodeError("not an image (unknown or unsupported format)") from exc
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, EOFError, struct.error...
        raise ImageDecodeError(f"corrupt or truncated image ({type(exc).__name__}: {exc})") from exc

    try:
        upright = ImageOps.exif_transpose(image)
    except Exception as exc:  # a malformed EXIF block should not cost an otherwise good image
        log.warning("ignoring unreadable EXIF orientation (%s)", exc)
        upright = image
    try:
        rgb = _to_rgb(upright)
    except Exception as exc:
        raise ImageDecodeError(f"cannot convert mode {upright.mode} to RGB ({exc})") from exc
    # never hand back the caller's own object: later in-place edits must not reach it
    return rgb.copy() if rgb is source else rgb


def eval_transform(pre: dict[str, Any]):
    """timm's eval transform (resize, centre crop, normalise) for a preprocessing spec
    (`features.preprocessing_spec`)."""
    from timm.data import create_transform

    return create_transform(
        input_size=tuple(pre["input_size"]), interpolation=pre["interpolation"], mean=tuple(pre["mean"]),
        std=tuple(pre["std"]), crop_pct=pre["crop_pct"], crop_mode=pre["crop_mode"], is_training=False,
    )


def train_transform(pre: dict[str, Any], *, crop_scale_min: float, hflip: float, color_jitter: float,
                    auto_augment: str | None, re_prob: float):
    """timm's training transform for the backbone's data config (input size, mean/std, interpolation)."""
    from timm.data import create_transform

    return create_transform(
        input_size=tuple(pre["input_size"]), is_training=True, scale=(crop_scale_min, 1.0),
        hflip=hflip, color_jitter=color_jitter, auto_augment=auto_augment,
        interpolation=pre["interpolation"], mean=tuple(pre["mean"]), std=tuple(pre["std"]),
        re_prob=re_prob,
    )


@contextlib.contextmanager
def _seeded_rng(seed: int) -> Iterator[None]:
    """Run a block under Python's, numpy's and torch's CPU RNG seeded by `seed`; restore them afterwards."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


class ImageDataset(Dataset):
    """Samples decoded (JPEG draft downscaling to `draft`) and transformed; an image that cannot be read
    or decoded is an item without a tensor and with the reason, never an exception.

    A key is an index, or (epoch, index) for augmented training: the transform then runs under an RNG
    seeded by (seed, epoch, index), so the augmentation of an image is the same whichever process or
    DataLoader worker decodes it (exact resume). An item is (index, tensor | None, label, reason).
    """

    def __init__(self, samples: Sequence[Sample], transform, draft: int | None, seed: int = 0):
        self.samples = list(samples)
        self.transform = transform
        self.draft = draft
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (None, key)
        sample = self.samples[i]
        try:
            image = decode_image(read_bytes(sample.locator), draft_size=self.draft)
        except (OSError, ValueError) as exc:  # ImageDecodeError and the sources' DataError are ValueErrors
            return i, None, sample.label, f"{type(exc).__name__}: {exc}"
        if epoch is None:
            return i, self.transform(image), sample.label, ""
        with _seeded_rng(derived_seed("augment", self.seed, epoch, i)):
            return i, self.transform(image), sample.label, ""


def epoch_batches(n: int, epoch: int, *, seed: int, batch_size: int, rank: int, world: int,
                  count: int) -> list[list[tuple[int, int]]]:
    """The first `count` batches of process `rank` (of `world`) in epoch `epoch` of training on `n`
    samples, as `ImageDataset` keys (epoch, index): the sample order of an epoch is a permutation seeded
    by (seed, epoch), and process r takes the r-th `batch_size` slice of every `batch_size * world`."""
    generator = torch.Generator().manual_seed(derived_seed("order", seed, epoch))
    order = torch.randperm(n, generator=generator).tolist()
    out = []
    for j in range(count):
        start = j * batch_size * world + rank * batch_size
        out.append([(epoch, i) for i in order[start:start + batch_size]])
    return out


def collate_images(batch: list[tuple[int, torch.Tensor | None, int, str]]):
    """(indices, images or None, labels or None, failed) of a batch of `ImageDataset` items; the
    tensors hold only the decoded images, `failed` is [(index, reason)] for the others."""
    ok = [(i, x, y) for i, x, y, _ in batch if x is not None]
    failed = [(i, reason) for i, x, _, reason in batch if x is None]
    if not ok:
        return [], None, None, failed
    return ([i for i, _, _ in ok], torch.stack([x for _, x, _ in ok]),
            torch.tensor([y for _, _, y in ok], dtype=torch.long), failed)
