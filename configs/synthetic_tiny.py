"""The embedded default: the tiny warmed-up model in dapo_jax/assets/ trained with the full DAPO recipe
on the built-in synthetic arithmetic task, on one CPU in a few minutes.

    python -m dapo_jax.train --config configs/synthetic_tiny.py --workdir runs/tiny [--config.seed=1]

(`python -m dapo_jax.train` with no arguments runs the same config.)
"""

from dapo_jax.config import default_config


def get_config():
    return default_config()
