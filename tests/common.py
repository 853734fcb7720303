"""Constants, tiny run parameters and small file helpers shared by the tests. Importing this module has no
side effects, unlike conftest (which sets up a private STAGE1_HOME): test modules import from here, also
those that run as scripts in children (test_finetune, test_peft), so conftest is imported once, by pytest."""

import io
import json
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

# the tiny random-init DINOv3 (Eva) architecture of the tests: 2 blocks, 32-d, 32 px
TINY_EVA = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 32}

# Limits on child processes and servers in tests bound a hang, never speed: on a loaded 2-core machine a
# child that takes 20 s alone takes minutes. A real hang still fails, after this long.
HANG_TIMEOUT_S = 600


def tiny_run_parameters(data, *, experiment: str, model_name: str) -> dict:
    """tests/test_flow.py's tiny run as JSON parameters (`stage1 train --params`, a deployment run):
    random-init tiny Eva, the folder `data`, 4 epochs, a loose guarantee."""
    return {
        "sources": [{"path": str(data), "kind": "folder", "name": "tiny"}],
        "splits": {"train": 0.45, "val": 0.15, "calib": 0.25, "test": 0.15},
        "backbone": {"name": "vit_small_patch16_dinov3", "weights": "random", "pooling": "cls+avg",
                     "model_kwargs": dict(TINY_EVA), "input_size": 32},
        "features": {"batch_size": 32, "num_workers": 0},
        "train": {"epochs": 4, "batch_size": 32},
        "guarantee": {"alpha": 0.2, "delta": 0.2},
        "registry": {"experiment": experiment, "model_name": model_name},
    }


@contextmanager
def edited_json(path: Path) -> Iterator[Any]:
    """A JSON file's document to change in place, written back when the block ends (tests forging files)."""
    doc = json.loads(path.read_text())
    yield doc
    path.write_text(json.dumps(doc))


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    """An image's file bytes in `fmt` (JPEG, PNG, ...), as Pillow writes them."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 70-byte PNG whose header claims width x height: a decompression bomb, built without the pixels."""
    raw = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    at = raw.index(b"IHDR")
    raw[at + 4:at + 12] = struct.pack(">II", width, height)
    raw[at + 17:at + 21] = struct.pack(">I", zlib.crc32(bytes(raw[at:at + 17])))
    return bytes(raw)
