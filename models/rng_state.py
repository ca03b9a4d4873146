"""Random generator states in checkpoints, so a resumed run draws what the uninterrupted one did.

The training process draws from python's ``random``, numpy's global generator, torch's CPU
generator and, once CUDA is initialised, one CUDA generator per device (dropout, MAE masks,
wav2vec2 span masks ...). :class:`TrainingRNG` saves all of them in every checkpoint, one
entry per rank, and puts them back when the resumed run starts training. Validation runs on a
fork of the states (:meth:`TrainingRNG.fork` / :meth:`TrainingRNG.join`), so whether and where
it runs never moves the training draws; a checkpoint saved during validation gets the training
states from before it. DataLoader workers do not use these states: their draws are seeded per
sample from the sample's stream position (:mod:`mmpt.datamodules.resume`).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("mmpt.models")

#: Checkpoint entry holding every rank's generator states.
RNG_KEY = "mmpt_rng"

#: Format of the checkpointed states.
VERSION = 1


def capture() -> dict[str, Any]:
    """This process's generator states, in types ``torch.load(weights_only=True)`` reads.

    Returns:
        ``python`` ([version, int64 tensor (625,), gauss]), ``numpy`` ([name, int64 tensor
        (624,), pos, has_gauss, cached_gaussian]), ``torch`` (uint8 tensor) and, when CUDA
        is initialised, ``cuda`` (one uint8 tensor per visible device).
    """
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    """Set this process's generators to ``state`` (from :func:`capture`).

    CUDA states are set only when the state has them and CUDA is available; a state saved
    on another number of visible devices sets none of them (and says so).
    """
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning(
                "the checkpoint's CUDA generator states are for %d devices, this process sees "
                "%d: they are not restored (GPU dropout draws differ from the saved run)",
                len(cuda),
                torch.cuda.device_count(),
            )


class TrainingRNG:
    """The training draws' generator states: saved per rank, restored at train start.

    The module calls :meth:`state_dict` when a checkpoint is saved (every rank: a collective
    under DDP/FSDP), :meth:`load_state_dict` when one is loaded, :meth:`apply` when training
    starts (after Lightning restored everything, before the first step), and :meth:`fork` /
    :meth:`join` around each validation run.
    """

    def __init__(self) -> None:
        self.loaded: dict[str, Any] | None = None
        self.forked: dict[str, Any] | None = None  # the training states while validation runs

    def state_dict(self, rank: int, world_size: int) -> dict[str, Any]:
        """Every rank's training states (those before validation, when saved during one)."""
        mine = self.forked if self.forked is not None else capture()
        ranks = [mine]
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            ranks = [None] * world_size
            dist.all_gather_object(ranks, mine)
        return {"version": VERSION, "world_size": world_size, "ranks": ranks}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Keep a checkpoint's states until training starts (:meth:`apply`)."""
        self.loaded = dict(state) if state else None

    def apply(self, rank: int, world_size: int) -> None:
        """Restore this rank's loaded states (once); a checkpoint without them changes nothing.

        A checkpoint saved with another number of ranks cannot give each rank its own
        states: the run goes on with fresh ones, and says so.
        """
        state, self.loaded = self.loaded, None
        if not state:
            return
        if state.get("version") != VERSION or state.get("world_size") != world_size:
            log.warning(
                "the checkpoint's random states (format %s, %s ranks) do not fit this run "
                "(format %d, %d ranks): not restored, so random draws differ from the saved run",
                state.get("version"),
                state.get("world_size"),
                VERSION,
                world_size,
            )
            return
        restore(state["ranks"][rank])

    def fork(self) -> None:
        """Set the training states aside (validation starts; its draws must not move them)."""
        if self.forked is None:
            self.forked = capture()

    def join(self) -> None:
        """Put the training states back as they were at :meth:`fork` (validation ended)."""
        state, self.forked = self.forked, None
        if state is not None:
            restore(state)
