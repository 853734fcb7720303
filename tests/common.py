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


# The operations tests (test_operations, test_promotion, test_deployments): their registered model, MLflow
# experiment and team settings file. The stage1core imports stay inside the functions (see the docstring).
MODEL = "stage1-ops-test"
EXPERIMENT = "ops-test"
# the default rule (MCC lower bound > 0, AUROC and FNR non-inferior), except: ~25 test images per class
# here (the default asks 200), fewer resamples, the floor lowered so that a random-init model
# can be champion at all, and an FNR margin of 0.5 instead of alpha: with ~25 test positives two bundles
# whose thresholds both guarantee FNR <= alpha differ by +-0.2 in test FNR by chance (one run measured
# +0.16, bound +0.29), so the default margin would decide these scenarios by noise; the FNR check has its
# own tests (test_promotion); as a team writes it in [promotion]
PROMOTION = {"n_bootstrap": 500, "min_test_per_class": 15, "fnr_margin": 0.5,
             "floor": {"min_mcc": -1.0, "min_auroc": 0.0}}


def team_settings(*folders, pretrained: bool = True, **over):
    """The team settings of the operations tests: EfficientNet-Lite0, pretrained or random-init, on `folders`."""
    from stage1core.backbone import DEMO_PACKAGE_WEIGHTS, RANDOM_WEIGHTS, BackboneConfig
    from stage1core.baselines import BaselineConfig
    from stage1core.features import FeatureConfig
    from stage1core.guarantees import GuaranteeConfig
    from stage1core.settings import TeamSettings
    from stage1core.sources import SourceConfig
    from stage1core.splits import SplitConfig
    from stage1core.train import TrainConfig

    base = {
        "model_name": MODEL, "experiment": EXPERIMENT,
        "sources": tuple(SourceConfig(path=str(f), kind="folder", name=f.name) for f in folders),
        "splits": SplitConfig(train=0.4, val=0.1, calib=0.2, test=0.3),
        "backbone": BackboneConfig(name="tf_efficientnet_lite0", pooling="avg",
                                   weights=DEMO_PACKAGE_WEIGHTS if pretrained else RANDOM_WEIGHTS),
        "features": FeatureConfig(batch_size=32, num_workers=0),
        "train": TrainConfig(epochs=4, batch_size=32),
        "guarantee": GuaranteeConfig(alpha=0.2, delta=0.2),
        "promotion": PROMOTION,
        # the rule is tested here; the baseline gate has its own test (test_promotion)
        "baselines": BaselineConfig(margin=0.9),
    }
    base.update(over)
    return TeamSettings(**base)


def settings_file(path, *folders, **over) -> str:
    """`team_settings(*folders, **over)` written to `path` as a team settings file; its path."""
    from stage1core.settings import write_settings

    return str(write_settings(team_settings(*folders, **over), path, force=True))


def artifacts_of(flow_run_id: str) -> dict[str, object]:
    """The Prefect artifacts of a flow run, by key (needs the Prefect test server)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return {a.key: a for a in found}
