"""Constants shared by the tests. Importing this module has no side effects, unlike conftest (which sets
up a private STAGE1_HOME): test modules import from here, also those that run as scripts in children
(test_finetune, test_peft), so conftest is imported once, by pytest."""

# the tiny random-init DINOv3 (Eva) architecture of the tests: 2 blocks, 32-d, 32 px
TINY_EVA = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 32}

# Limits on child processes and servers in tests bound a hang, never speed: on a loaded 2-core machine a
# child that takes 20 s alone takes minutes. A real hang still fails, after this long.
HANG_TIMEOUT_S = 600
