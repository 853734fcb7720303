"""decode_image: upright 8-bit RGB out of every common input, errors for everything broken."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from stage1core.images import MAX_PIXELS, ImageDecodeError, decode_image
from tests.common import encode, png_claiming


def halves(width: int, height: int, left=(255, 0, 0), right=(0, 0, 255)) -> Image.Image:
    """Left half one colour, right half another: rotations are easy to tell apart."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = left
    arr[:, width // 2 :] = right
    return Image.fromarray(arr)


def smooth_photo(width: int, height: int) -> Image.Image:
    """Smooth gradients and a few shapes: a stand-in for a camera photo (JPEG-friendly content)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    arr = np.stack(
        [
            255 * xx / width,
            255 * yy / height,
            127.5 + 127.5 * np.sin(xx / width * 6.0) * np.cos(yy / height * 4.0),
        ],
        axis=-1,
    )
    arr[(xx - width * 0.6) ** 2 + (yy - height * 0.4) ** 2 < (height * 0.15) ** 2] = (255, 140, 0)
    return Image.fromarray(arr.astype(np.uint8))


def with_orientation(image: Image.Image, orientation: int, **kwargs) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif.tobytes(), quality=95, **kwargs)


# ----------------------------------------------------------------------------------------------- errors


def test_zero_bytes_raise():
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"")


def test_empty_file_raises(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(ImageDecodeError, match="cannot read"):
        decode_image(tmp_path / "nope.jpg")


def test_not_an_image_raises():
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_image(b"this is a text file, not a picture" * 10)


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_jpeg_raises_instead_of_returning_grey_rows(fraction):
    data = encode(smooth_photo(640, 480), "JPEG", quality=90)
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(data[: int(len(data) * fraction)])


def test_truncated_png_raises():
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "PNG")
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2])


def test_corrupt_png_raises():
    data = bytearray(encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)),
                            "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 4 : idat + 6] = b"\xff\xff"  # break the zlib stream header
    with pytest.raises(ImageDecodeError, match="corrupt"):
        decode_image(bytes(data))


def test_too_large_raises_before_decoding(monkeypatch):
    # our guard holds even when a library has switched PIL's global limit off
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    side = int((MAX_PIXELS + 1) ** 0.5) + 1
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(png_claiming(side, side))


def test_max_pixels_is_per_call():
    data = encode(Image.new("RGB", (20, 20)), "PNG")
    assert decode_image(data).size == (20, 20)
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(data, max_pixels=399)


def test_bad_draft_size_is_a_caller_error():
    with pytest.raises(ValueError, match="draft_size"):
        decode_image(encode(Image.new("RGB", (8, 8)), "JPEG"), draft_size=0)


# ----------------------------------------------------------------------------------------------- modes


def test_inputs_bytes_path_and_pil_agree(tmp_path):
    image = smooth_photo(40, 30)
    data = encode(image, "PNG")
    path = tmp_path / "a.png"
    path.write_bytes(data)
    out = [decode_image(data), decode_image(path), decode_image(str(path)), decode_image(image)]
    for decoded in out:
        assert decoded.mode == "RGB" and decoded.size == (40, 30)
        assert np.array_equal(np.asarray(decoded), np.asarray(image))
    assert out[3] is not image  # never the caller's own object


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP"])
def test_other_formats_decode(fmt):
    image = smooth_photo(32, 24)
    decoded = decode_image(encode(image, fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    assert decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_rgba_is_composited_on_white():
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[0, 0] = (255, 0, 0, 255)  # opaque red
    arr[0, 1] = (255, 0, 0, 0)  # fully transparent
    arr[1, 0] = (0, 0, 0, 128)  # half-transparent black
    decoded = np.asarray(decode_image(encode(Image.fromarray(arr, "RGBA"), "PNG")))
    assert tuple(decoded[0, 0]) == (255, 0, 0)
    assert tuple(decoded[0, 1]) == (255, 255, 255)
    assert all(abs(int(v) - 127) <= 1 for v in decoded[1, 0])


def test_la_is_composited_on_white():
    image = Image.new("LA", (2, 1))
    image.putpixel((0, 0), (0, 255))
    image.putpixel((1, 0), (0, 0))
    decoded = np.asarray(decode_image(encode(image, "PNG")))
    assert tuple(decoded[0, 0]) == (0, 0, 0) and tuple(decoded[0, 1]) == (255, 255, 255)


def test_palette_with_transparency_is_composited_on_white():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 255, 0] + [255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    decoded = np.asarray(decode_image(encode(image, "PNG", transparency=0)))
    assert tuple(decoded[0, 0]) == (255, 255, 255)  # index 0 is transparent
    assert tuple(decoded[0, 1]) == (255, 0, 0)


def test_palette_without_transparency_keeps_colours():
    image = Image.new("P", (1, 1))
    image.putpalette([10, 20, 30] + [0] * 765)
    assert tuple(np.asarray(decode_image(encode(image, "PNG")))[0, 0]) == (10, 20, 30)


@pytest.mark.parametrize("via_png", [False, True])
def test_16bit_grayscale_is_scaled_not_clipped(via_png):
    arr = np.array([[0, 257, 32896, 65535]], np.uint16)
    image = Image.fromarray(arr)
    assert image.mode.startswith("I;16")
    decoded = np.asarray(decode_image(encode(image, "PNG") if via_png else image))
    assert decoded[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (decoded[..., 0] == decoded[..., 1]).all() and (decoded[..., 1] == decoded[..., 2]).all()


def test_32bit_integer_grayscale_uses_the_16bit_range():
    image = Image.fromarray(np.array([[0, 65535, 70000, -5]], np.int32), mode="I")
    assert np.asarray(decode_image(image))[0, :, 0].tolist() == [0, 255, 255, 0]


def test_grayscale_and_bilevel_become_rgb():
    gray = np.asarray(decode_image(encode(Image.new("L", (3, 3), 77), "PNG")))
    assert gray.shape == (3, 3, 3) and (gray == 77).all()
    bits = np.asarray(decode_image(encode(Image.new("1", (3, 3), 1), "PNG")))
    assert (bits == 255).all()


def test_cmyk_jpeg_becomes_rgb():
    image = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    decoded = decode_image(encode(image, "JPEG", quality=100))
    assert decoded.mode == "RGB"
    r, g, b = np.asarray(decoded).reshape(-1, 3).mean(axis=0)
    assert r > 230 and g < 30 and b < 30


# ----------------------------------------------------------------------------------------------- EXIF


@pytest.mark.parametrize(
    ("orientation", "top", "bottom"),
    [(6, (255, 0, 0), (0, 0, 255)), (8, (0, 0, 255), (255, 0, 0))],
)
def test_exif_rotated_jpeg_comes_out_upright(orientation, top, bottom):
    # stored 64x32 (red left, blue right); orientation 6 = turn 90 deg clockwise to display
    decoded = decode_image(with_orientation(halves(64, 32), orientation))
    assert decoded.size == (32, 64)
    arr = np.asarray(decoded).astype(int)
    assert np.abs(arr[4, 16] - top).max() < 40
    assert np.abs(arr[60, 16] - bottom).max() < 40


def test_exif_orientation_3_turns_upside_down():
    decoded = np.asarray(decode_image(with_orientation(halves(64, 32), 3))).astype(int)
    assert np.abs(decoded[16, 4] - (0, 0, 255)).max() < 40  # blue now on the left


def test_exif_rotation_with_draft_keeps_shorter_side():
    # 800x200 stored, displayed 200x800; the draft must keep the displayed shorter side >= 50
    decoded = decode_image(with_orientation(smooth_photo(800, 200), 6), draft_size=50)
    assert decoded.size[0] < decoded.size[1]
    assert min(decoded.size) >= 50
    assert decoded.size == (50, 200)  # scale 1/4 chosen: 200 // 50 = 4


# ----------------------------------------------------------------------------------------------- draft


def to_short_side(image: Image.Image, side: int) -> Image.Image:
    w, h = image.size
    scale = side / min(w, h)
    return image.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)


def test_draft_decodes_camera_jpeg_small_and_nearly_identical():
    data = encode(smooth_photo(4032, 3024), "JPEG", quality=92)
    full = decode_image(data)
    drafted = decode_image(data, draft_size=224)
    assert full.size == (4032, 3024)
    assert drafted.size == (504, 378)  # DCT scale 1/8, decoded small: far less work than the full image
    assert min(drafted.size) >= 224
    a = np.asarray(to_short_side(full, 224)).astype(np.float32)
    b = np.asarray(to_short_side(drafted, 224)).astype(np.float32)
    assert a.shape == b.shape == (224, 299, 3)
    assert np.abs(a - b).mean() < 3.0


@pytest.mark.parametrize(
    ("size", "draft", "expected"), [((1000, 600), 224, (500, 300)), ((300, 300), 224, (300, 300))]
)
def test_draft_never_goes_below_the_requested_size(size, draft, expected):
    drafted = decode_image(encode(smooth_photo(*size), "JPEG"), draft_size=draft)
    assert drafted.size == expected


def test_draft_is_ignored_for_png():
    assert decode_image(encode(smooth_photo(1000, 800), "PNG"), draft_size=100).size == (1000, 800)


def test_draft_applies_to_unloaded_pil_jpeg():
    lazy = Image.open(io.BytesIO(encode(smooth_photo(1600, 1200), "JPEG")))
    assert decode_image(lazy, draft_size=224).size == (400, 300)


# ---------------------------------------------------------------------------------------------------
# ImageDataset and epoch_batches: the one path from a sample's bytes to a model input


def _samples(tmp_path, n=4):
    from stage1core.sources import Sample

    out = []
    for i in range(n):
        path = tmp_path / f"img_{i}.png"
        path.write_bytes(encode(halves(40 + 8 * i, 30), "PNG"))
        out.append(Sample(sample_id=f"{i:064d}", label=i % 2, source="test", role="all", locator=str(path)))
    return out


def test_dataset_reports_unreadable_images_instead_of_raising(tmp_path):
    import torch

    from stage1core.images import ImageDataset, collate_images

    samples = _samples(tmp_path)
    (tmp_path / "img_1.png").write_bytes(b"not an image")
    (tmp_path / "img_2.png").unlink()
    to_tensor = lambda image: torch.from_numpy(np.array(image.resize((8, 8)))).permute(2, 0, 1).float()
    dataset = ImageDataset(samples, to_tensor, draft=None)
    index, images, labels, failed = collate_images([dataset[i] for i in range(4)])
    assert index == [0, 3] and images.shape == (2, 3, 8, 8) and labels.tolist() == [0, 1]
    assert [i for i, _ in failed] == [1, 2]
    assert "ImageDecodeError" in failed[0][1] and "cannot read the image" in failed[1][1]
    assert collate_images([dataset[1]]) == ([], None, None, [(1, failed[0][1])])


def test_augmentation_depends_on_seed_epoch_and_index_only(tmp_path):
    import random

    import torch

    from stage1core.images import ImageDataset

    samples = _samples(tmp_path)
    noisy = lambda image: torch.tensor([random.random(), float(np.random.random()), float(torch.rand(()))])
    dataset = ImageDataset(samples, noisy, draft=None, seed=5)
    first = dataset[(2, 1)][1]
    torch.manual_seed(123)  # the global RNG (dropout's) neither matters nor moves
    random.seed(9)
    state = torch.get_rng_state()
    assert torch.equal(dataset[(2, 1)][1], first)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(dataset[(3, 1)][1], first) and not torch.equal(dataset[(2, 0)][1], first)
    assert not torch.equal(ImageDataset(samples, noisy, draft=None, seed=6)[(2, 1)][1], first)


def test_epoch_batches_split_one_seeded_order_between_processes():
    from stage1core.images import epoch_batches

    one = epoch_batches(10, 3, seed=1, batch_size=2, rank=0, world=1, count=5)
    two = [epoch_batches(10, 3, seed=1, batch_size=1, rank=r, world=2, count=5) for r in range(2)]
    order = [i for batch in one for _, i in batch]
    assert sorted(order) == list(range(10)) and all(e == 3 for batch in one for e, _ in batch)
    # the two processes see the single process's batches, each its own half of every batch
    assert [[i for _, i in b0 + b1] for b0, b1 in zip(*two, strict=True)] == [[i for _, i in b] for b in one]
    assert order != [i for batch in epoch_batches(10, 4, seed=1, batch_size=2, rank=0, world=1, count=5)
                     for _, i in batch]
