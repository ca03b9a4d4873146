"""Per-sample random seeds: a sample's augmentations depend on where it is in its stream only.

DataLoader workers draw random crops, flips, caption choices and audio windows from the global
generators. Seeding them for each sample from the sample's stream position makes those draws
independent of what the worker decoded before, so a resumed worker that skipped ahead without
decoding draws exactly what the uninterrupted one drew (:mod:`mmpt.datamodules.resume`).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator

import numpy as np
import torch


def sample_seed(*parts: int | str) -> int:
    """A 64-bit seed from ints and strings, the same in every process (no ``hash()``)."""
    blob = repr(tuple(parts)).encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little")


@contextlib.contextmanager
def seeded(seed: int, restore: bool) -> Iterator[None]:
    """Seed python's ``random``, numpy's and torch's CPU generator for a block.

    Args:
        seed: 64-bit seed (numpy takes its low 32 bits).
        restore: Put the caller's states back afterwards (decoding in the training process,
            whose own draws must not move); a DataLoader worker leaves the seeded states, so
            what it draws between samples (a batcher) also follows the stream position.
    """
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if restore else None
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])
