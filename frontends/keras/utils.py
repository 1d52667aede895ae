"""keras.utils: seeding, as Keras's set_random_seed (every draw Kiln makes is numpy's)."""

from __future__ import annotations

import random

import numpy as np

_rng = np.random.default_rng()


def set_random_seed(seed: int) -> None:
    """Seed Python's and numpy's generators and the one Kiln draws initial weights,
    shuffles and dropout masks from: runs with the same seed are identical."""
    global _rng
    random.seed(seed)
    np.random.seed(seed)
    _rng = np.random.default_rng(seed)


def rng() -> np.random.Generator:
    return _rng


def set_rng_state(state: dict) -> None:
    """Continue Kiln's generator from `state` (a bit_generator.state): processes
    training together share one stream of shuffles and dropout masks."""
    _rng.bit_generator.state = state
