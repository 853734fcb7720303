"""Procedural street scenes: the demo's embedded dataset, and a fixture for tests.

No data can be downloaded where the demo runs, so this package draws its own: a dash-cam view of a street
(road in perspective, lane marks, kerbs, sky, buildings, trees, cars, pedestrians, road signs) with
lighting, blur and sensor noise. Positives add roadwork evidence (cones, striped barriers, roadwork
signs, workers in high-visibility vests, fences, diggers); the shared background carries hard negatives
(orange cars, autumn trees, plain and warning signs, people in orange clothes, dusk skies) so a classifier
needs object-level features, not a colour histogram. Everything is deterministic by seed: image i uses
its own generator seeded from (seed, i), so files do not depend on generation order.

The painters are layered by what they draw, each built on the one before: `canvas` (camera, depth
queue, film), `scenery` (sky, buildings, road), `street` (trees, traffic, people, signs), `roadwork`
(cones, barriers, workers, sites; `render_scene`). `dataset` writes the dataset to disk.

Hand-written because no maintained library renders labelled street scenes offline.
"""

from .dataset import (
    CLASS_DIRS,
    DEFAULT_N_IMAGES,
    GENERATOR_VERSION,
    LARGE_SIZE,
    DemoConfig,
    demo_dataset_ready,
    generate_demo_dataset,
    near_duplicate,
    render_demo_image,
)
from .roadwork import render_scene

__all__ = [
    "CLASS_DIRS",
    "DEFAULT_N_IMAGES",
    "GENERATOR_VERSION",
    "LARGE_SIZE",
    "DemoConfig",
    "demo_dataset_ready",
    "generate_demo_dataset",
    "near_duplicate",
    "render_demo_image",
    "render_scene",
]
