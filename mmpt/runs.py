"""Run identities for ``mmpt fit``: each fit its own run folder, ``last`` within it, a lock.

A recipe's logger (CSV or TensorBoard, ``version`` unset) writes into ``<save_dir>/<name>/``,
one ``version_N`` folder a run, and its ``ModelCheckpoint`` without ``dirpath`` into that
folder's ``checkpoints/``. :func:`claim_fit_run` makes that explicit before anything is built:

- a new fit creates the next ``version_N`` with an exclusive ``mkdir``, so two fits started at
  once get two folders (Lightning's logger would give both the same number);
- ``--ckpt_path last`` resumes the newest run of this config that has a ``checkpoints/last.ckpt``
  (that exact file: never a ``last-v1.ckpt``, never another config's run), and the resumed fit
  goes on writing into that same folder; an explicit ``--ckpt_path runs/x/version_2/...`` goes
  on in ``version_2``;
- rank 0 locks the run folder (:class:`mmpt.run_lock.RunLock`) until the fit ends: a second
  fit into the same run is refused; once locked, the hidden ``checkpoints/.*.tmp`` files a
  killed writer left (never read: :mod:`mmpt.checkpoint_io`) are removed;
- a fit that fails before its first optimizer step, in a folder it created, removes that folder
  (nothing in it but the saved config), so no empty ``version_N`` is left behind.

The other ranks of a DDP fit take the folder and checkpoint rank 0 chose (``MMPT_RUN`` in the
environment the launcher copies); ranks started on their own (torchrun, SLURM) resolve ``last``
the same way, read-only. Loggers of other kinds (W&B ...) are left to Lightning.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from mmpt.run_lock import RunFolderError, RunLock

#: Environment variable through which rank 0 hands its run folder to the ranks it launches.
RUN_ENV = "MMPT_RUN"
_VERSION = re.compile(r"^version_(\d+)$")
_RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 (or not distributed), from the launchers' env."""
    return all(os.environ.get(var, "0") == "0" for var in _RANK_VARS)


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _is(node: Any, base: type) -> bool:
    cls = _import(str(node.class_path)) if getattr(node, "class_path", None) else None
    return isinstance(cls, type) and issubclass(cls, base)


@dataclasses.dataclass
class RunLayout:
    """Where a config's runs live and where their ``last`` checkpoints are.

    Attributes:
        root: ``<save_dir>/<name>``, the folder of the ``version_N`` runs.
        version: The logger's fixed ``version`` (None: one ``version_N`` a run).
        last_names: File names of the ``last`` checkpoints in a run's ``checkpoints/``.
        logger: The first logger's config node (its ``init_args.version`` is set).
        checkpoints: The ``ModelCheckpoint`` config nodes that write into the run folder.
    """

    root: Path
    version: int | str | None
    last_names: list[str]
    logger: Any
    checkpoints: list[Any]

    def run_dir(self, version: int | str) -> Path:
        """The folder of run ``version`` (Lightning's naming: ints become ``version_N``)."""
        return self.root / (version if isinstance(version, str) else f"version_{version}")

    def last_checkpoint(self, run_dir: Path) -> Path | None:
        """The newest complete ``last`` checkpoint of one run, or None."""
        found = [run_dir / "checkpoints" / n for n in self.last_names]
        found = [p for p in found if p.is_file()]
        return max(found, key=lambda p: p.stat().st_mtime) if found else None

    def versions(self) -> list[int]:
        """The numbers of the ``version_N`` folders under ``root``, ascending."""
        if not self.root.is_dir():
            return []
        names = (p.name for p in self.root.iterdir() if p.is_dir() and not p.is_symlink())
        return sorted(int(m.group(1)) for n in names if (m := _VERSION.match(n)))


def run_layout(cfg: Any) -> RunLayout | None:
    """The run layout of a parsed ``fit`` config; None when its first logger is not CSV/TB.

    Args:
        cfg: The ``fit`` namespace (``trainer.logger`` with ``save_dir`` already filled).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = cfg.get("trainer.logger")
    first = loggers[0] if isinstance(loggers, list) and loggers else loggers
    if not _is(first, (CSVLogger, TensorBoardLogger)):
        return None
    args = first.init_args
    name = args.get("name")
    name = "lightning_logs" if name is None else str(name)
    save_dir = args.get("save_dir") or cfg.get("trainer.default_root_dir") or "."
    own = [
        cb
        for cb in cfg.get("trainer.callbacks") or []
        if _is(cb, ModelCheckpoint) and cb.init_args.get("dirpath") is None
    ]
    names = {"last.ckpt"} if not own else set()
    for cb in own:
        cls = _import(str(cb.class_path))
        names.add(f"{cls.CHECKPOINT_NAME_LAST}{cls.FILE_EXTENSION}")
    return RunLayout(Path(save_dir) / name, args.get("version"), sorted(names), first, own)


@dataclasses.dataclass
class RunClaim:
    """A fit's hold on its run folder, from the parse to the end of ``fit``.

    Attributes:
        run_dir: The run's folder.
        created: This fit made the folder (a new run, not a resume).
        ckpt_path: The checkpoint it resumes from, or None.
        lock: The folder's lock (rank 0), or None.
    """

    run_dir: Path
    created: bool
    ckpt_path: str | None
    lock: RunLock | None = None

    def close(self, failed: bool, trained: bool) -> None:
        """Release the lock; after a failure before any step, remove the folder it created.

        Args:
            failed: ``fit`` raised (or was interrupted).
            trained: At least one optimizer step ran.
        """
        if self.lock is None:
            return
        keep = trained or any(self.run_dir.rglob("*.ckpt"))
        if failed and self.created and not keep:  # removed while still locked
            shutil.rmtree(self.run_dir, ignore_errors=True)
        self.lock.release()
        os.environ.pop(RUN_ENV, None)


def _new_version(root: Path) -> int:
    """Create the next free ``root/version_N`` exclusively; returns N."""
    root.mkdir(parents=True, exist_ok=True)
    layout = RunLayout(root, None, [], None, [])
    n = max(layout.versions(), default=-1) + 1
    while True:
        try:
            (root / f"version_{n}").mkdir()
            return n
        except FileExistsError:
            n += 1


def _resume_target(layout: RunLayout, ckpt_path: str | None) -> tuple[int | None, str | None]:
    """(version to continue, checkpoint) for a config whose ``version`` is unset."""
    if ckpt_path == "last":
        for n in reversed(layout.versions()):
            last = layout.last_checkpoint(layout.run_dir(n))
            if last is not None:
                return n, str(last)
        return None, None
    if ckpt_path and Path(ckpt_path).is_file():
        try:
            rel = Path(ckpt_path).resolve().relative_to(layout.root.resolve())
        except ValueError:
            return None, ckpt_path
        match = _VERSION.match(rel.parts[0]) if len(rel.parts) > 1 else None
        return (int(match.group(1)) if match else None), ckpt_path
    return None, ckpt_path


def _resolve(
    layout: RunLayout, ckpt: str | None, warn: bool
) -> tuple[int | str | None, str | None]:
    """(run version, checkpoint) of a fit, read-only; version None: a new ``version_N``.

    Raises:
        mmpt.run_lock.RunFolderError: A new fit into a fixed ``version`` that holds a checkpoint.
    """
    if not layout.checkpoints:  # no checkpoints in the run folder: Lightning resolves `last`
        return layout.version, ckpt
    if layout.version is None:
        version, resumed = _resume_target(layout, ckpt)
    else:
        version, resumed = layout.version, ckpt
        run_dir = layout.run_dir(version)
        last = layout.last_checkpoint(run_dir)
        if ckpt is None and last is not None:
            raise RunFolderError(
                f"{run_dir} already holds {last} from an earlier fit: resume it with "
                "--ckpt_path last, or start a new run (another "
                "--trainer.logger.init_args.version, or leave it unset for the next version_N)"
            )
        if ckpt == "last":
            resumed = None if last is None else str(last)
    if ckpt == "last" and resumed is None and warn:
        warnings.warn(
            f"--ckpt_path last: no run under {layout.root} has a checkpoints/"
            f"{layout.last_names[0]} yet; starting a new run",
            stacklevel=3,
        )
    return version, resumed


def claim_fit_run(cfg: Any) -> RunClaim | None:
    """Choose, create and lock the run folder of a ``fit``; resolve ``--ckpt_path last``.

    Sets the logger's ``version``, ``ckpt_path`` (a concrete file or None) and
    ``enable_version_counter: false`` on the run's own checkpoint callbacks (the folder is this
    run's alone, so ``last.ckpt`` is overwritten in place, never joined by ``last-v1.ckpt``).

    Args:
        cfg: The parsed ``fit`` namespace, changed in place.

    Returns:
        The claim (close it when ``fit`` ends), or None for loggers this does not manage.

    Raises:
        mmpt.run_lock.RunLockedError: Another live fit holds the run folder.
        mmpt.run_lock.RunFolderError: A new fit into a fixed ``version`` folder that holds an
            earlier fit's checkpoint.
    """
    layout = run_layout(cfg)
    if layout is None:
        return None
    ckpt = cfg.get("ckpt_path")
    ckpt = None if ckpt is None else str(ckpt)
    for cb in layout.checkpoints:
        cb.init_args.enable_version_counter = False
    if not is_rank_zero():
        handed = json.loads(os.environ.get(RUN_ENV) or "null")
        if handed is not None:
            version, ckpt = handed["version"], handed["ckpt_path"]
        else:
            version, ckpt = _resolve(layout, ckpt, warn=False)
        if version is not None:
            layout.logger.init_args.version = version
        cfg.ckpt_path = ckpt
        return None
    version, ckpt = _resolve(layout, ckpt, warn=True)
    if version is None:
        version, created = _new_version(layout.root), True
    else:
        created = not layout.run_dir(version).exists()
        layout.run_dir(version).mkdir(parents=True, exist_ok=True)
    advice = (
        "Start a separate run instead: leave out --ckpt_path (a new version_N)."
        if layout.version is None
        else "Start a separate run instead: another --trainer.logger.init_args.version."
    )
    run_dir = layout.run_dir(version)
    lock = RunLock(run_dir, advice)
    try:
        lock.acquire()
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if not created:  # partial writes of a killed fit of this run (mmpt.io.atomic_write)
        for tmp in (run_dir / "checkpoints").glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
    layout.logger.init_args.version = version
    cfg.ckpt_path = ckpt
    os.environ[RUN_ENV] = json.dumps({"version": version, "ckpt_path": ckpt})
    return RunClaim(run_dir, created, ckpt, lock)
