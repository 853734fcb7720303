"""Constants and tiny run parameters shared by the tests. Importing this module has no side effects,
unlike conftest (which sets up a private STAGE1_HOME): test modules import from here, also those that
run as scripts in children (test_finetune, test_peft), so conftest is imported once, by pytest."""

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
