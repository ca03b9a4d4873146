"""Checks of a parsed training config before anything is built: devices and every weights path.

A recipe names local weights folders (``pretrained: /models/Qwen2.5-1.5B``) and, next to each,
the hub repo they come from (``repo_id: Qwen/Qwen2.5-1.5B``). A class says which of its
arguments are such paths with a ``weight_paths`` class attribute, so no list here needs an
edit when an encoder is added. :func:`preflight` reports every missing path at once, each with
the flag that sets it and the ``hf download`` command that fetches it, together with a GPU
recipe started on a machine without GPUs.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mmpt.user_errors import UserError

#: The argument of a class that holds the hub repo its ``weight_paths`` come from.
REPO_ARG = "repo_id"
#: Arguments naming a checkpoint written by an earlier run (a previous stage), not a download.
CHECKPOINT_ARGS = ("init_from",)
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".tar")
_GPU_ACCELERATORS = ("gpu", "cuda")
# torch's first FullyShardedDataParallel needs an accelerator; FSDP2 (fully_shard) runs on gloo.
_GPU_STRATEGIES = ("fsdp", "fsdpstrategy")


@dataclass(frozen=True)
class MissingPath:
    """A path the config names that is neither on disk nor in the Hugging Face cache.

    Attributes:
        flag: The command-line flag that sets it, e.g. ``--model.llm.pretrained``.
        path: The value, e.g. ``/models/Qwen2.5-1.5B``.
        repo_id: The hub repo the config says it comes from (None: the config names none).
        checkpoint: Whether it is a checkpoint of an earlier run (``init_from``).
        takes_repo_id: Whether the class that reads it has a ``repo_id`` argument.
    """

    flag: str
    path: str
    repo_id: str | None = None
    checkpoint: bool = False
    takes_repo_id: bool = True

    def lines(self) -> list[str]:
        """Two lines: the flag and path, then how to get it."""
        head, indent = f"  {self.flag} {self.path}", " " * 6
        if self.checkpoint:
            return [head, f"{indent}no such checkpoint: train the stage that writes it first"]
        command = download_command(self.path, self.repo_id)
        if command:
            return [head, indent + command]
        if not self.takes_repo_id:
            return [head, f"{indent}not found: point the flag at your local copy"]
        return [head, f"{indent}the config names no repo for it: set {repo_flag(self.flag)}"]


def repo_flag(flag: str) -> str:
    """``--model.llm.pretrained`` -> ``--model.llm.repo_id``."""
    return flag.rsplit(".", 1)[0] + f".{REPO_ARG}"


def download_command(path: str, repo_id: str | None) -> str | None:
    """The ``hf download`` command that puts ``path`` in place; None when no repo is known.

    Args:
        path: A local folder or file, or a repo id read from the Hugging Face cache.
        repo_id: The hub repo ``path`` is a copy of (the recipe's ``repo_id``), if any.

    Returns:
        ``hf download REPO --local-dir PATH`` for a local folder (its parent for a file) with
        ``repo_id``, ``hf download ORG/NAME`` for a repo id (into the cache), else None.
    """
    if repo_id and path != repo_id:
        local = os.path.dirname(path) if _looks_like_file(path) else path
        return f"hf download {repo_id} --local-dir {local}"
    if _looks_like_repo_id(path):
        return f"hf download {path}"
    return None


def missing_weights_error(what: str, path: str, repo_id: str | None, flag: str) -> Exception:
    """A component's own error for weights not found (when it is built without the preflight).

    Args:
        what: What the weights are, e.g. ``"LLM weights"``.
        path: The value of ``flag``.
        repo_id: The hub repo the config names for it, if any.
        flag: The flag that sets ``path``, e.g. ``--model.init_args.llm.init_args.pretrained``.

    Returns:
        A ``FileNotFoundError`` naming the flag and the download command (or how to get one).
    """
    command = download_command(path, repo_id)
    how = (
        f"On a machine with internet run `{command}`"
        if command
        else f"Point {flag} at a local copy, or add `{REPO_ARG}: ORG/NAME` (the hub repo it "
        "comes from) next to it in the config to be told the download command"
    )
    return FileNotFoundError(
        f"{what} not found at {path!r} (nothing is downloaded at run time). {how}; {flag} "
        "sets where they are read."
    )


def _looks_like_repo_id(path: str) -> bool:
    """``org/name``, not a local path.

    No filesystem prefix (``/``, ``.``, ``~``), no file suffix, and ``org`` not a folder here
    (``data/tokenizer`` is a local path).
    """
    parts = path.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not path.startswith((".", "~"))
        and not _looks_like_file(path)
        and not os.path.isdir(parts[0])
    )


def _looks_like_file(path: str) -> bool:
    return path.endswith(_FILE_SUFFIXES)


def _available(path: str) -> bool:
    """On disk (a folder not empty), or a repo id already in the Hugging Face cache."""
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        return any(os.scandir(local))  # an empty folder: a download that never happened
    if os.path.exists(local):
        return True
    if not _looks_like_repo_id(path):
        return False
    from huggingface_hub.constants import HF_HUB_CACHE

    return os.path.isdir(os.path.join(HF_HUB_CACHE, "models--" + path.replace("/", "--")))


def _import(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:  # jsonargparse reports a wrong class_path itself
        return None


def _flag(keys: tuple[str, ...]) -> str:
    return "--" + ".".join(k for k in keys if k != "init_args")


def _class_nodes(value: Any, keys: tuple[str, ...] = ()) -> Iterator[tuple[tuple, str, dict]]:
    """Every ``{class_path, init_args}`` node of a config: (keys to it, class path, init args)."""
    if isinstance(value, dict):
        if isinstance(value.get("class_path"), str):
            yield keys, value["class_path"], value.get("init_args") or {}
        for key, item in value.items():
            yield from _class_nodes(item, (*keys, str(key)))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _class_nodes(item, (*keys, str(i)))


def missing_weights(config: dict[str, Any], model_init_from: bool = True) -> list[MissingPath]:
    """Every weights path (and ``init_from`` checkpoint) of ``config`` that is not there.

    Args:
        config: A parsed config as a dict (``trainer``, ``model``, ``data`` ...).
        model_init_from: Check ``model.init_from`` too. The Trainer applies it (fit, validate,
            test, predict); ``mmpt eval``/``export`` load a checkpoint instead. A tower's own
            ``init_from`` is read when the tower is built, so it is always checked.

    Returns:
        One entry per missing path, in config order; a path named twice is listed once.
    """
    found: dict[str, MissingPath] = {}
    for keys, class_path, init_args in _class_nodes(config):
        cls = _import(class_path)
        names = tuple(getattr(cls, "weight_paths", ()))
        checkpoints = CHECKPOINT_ARGS if model_init_from or keys != ("model",) else ()
        for name in (*names, *checkpoints):
            value = init_args.get(name)
            values = value if isinstance(value, list | tuple) else [value]
            for path in values:
                if isinstance(path, str) and path not in found and not _available(path):
                    found[path] = MissingPath(
                        _flag((*keys, "init_args", name)),
                        path,
                        init_args.get(REPO_ARG),
                        checkpoint=name in CHECKPOINT_ARGS,
                        takes_repo_id=REPO_ARG in inspect.signature(cls).parameters,
                    )
    return list(found.values())


def _strategy_name(strategy: Any) -> str:
    if isinstance(strategy, dict):
        strategy = strategy.get("class_path", "")
    return str(strategy or "auto").rsplit(".", 1)[-1].lower()


def cpu_overrides(trainer: dict[str, Any], cuda_available: bool) -> list[str]:
    """The overrides that run a GPU recipe on this machine's CPU; empty when none are needed.

    Args:
        trainer: The config's ``trainer`` section.
        cuda_available: Whether this machine has a CUDA GPU.

    Returns:
        E.g. ``["--trainer.accelerator cpu", "--trainer.devices 1", ...]``.
    """
    if cuda_available:
        return []
    accelerator = str(trainer.get("accelerator") or "auto").lower()
    strategy = _strategy_name(trainer.get("strategy"))
    gpu_strategy = strategy in _GPU_STRATEGIES or strategy.startswith("fsdp_")
    if accelerator not in _GPU_ACCELERATORS and not gpu_strategy:
        return []
    overrides = ["--trainer.accelerator cpu", "--trainer.devices 1"]
    if strategy != "auto":
        overrides.append("--trainer.strategy auto")
    if int(trainer.get("num_nodes") or 1) > 1:
        overrides.append("--trainer.num_nodes 1")
    if str(trainer.get("precision") or "32-true") not in ("32", "32-true"):
        overrides.append("--trainer.precision 32-true")
    return overrides


def _device_lines(trainer: dict[str, Any], overrides: list[str]) -> list[str]:
    asked = ", ".join(
        f"trainer.{k}: {_strategy_name(v) if k == 'strategy' else v}"
        for k in ("accelerator", "devices", "num_nodes", "strategy")
        if (v := trainer.get(k)) not in (None, "auto", 1)
    )
    return [
        f"this config asks for GPUs ({asked}) and this machine has no CUDA GPU.",
        "  To run it on CPU (a smoke test), add:",
        "    " + " ".join(overrides),
    ]


def preflight(config: dict[str, Any], training: bool = True) -> None:
    """Raise one :class:`UserError` naming every device and weights problem of ``config``.

    Args:
        config: A parsed config as a dict (``trainer``, ``model``, ``data`` ...).
        training: For the Trainer's subcommands (fit, validate, test, predict): also check
            ``trainer`` against this machine's GPUs and ``model.init_from``.

    Raises:
        UserError: A GPU recipe on a machine without CUDA, missing weights, or both.
    """
    lines: list[str] = []
    trainer = config.get("trainer") or {}
    if training:
        import torch

        overrides = cpu_overrides(trainer, torch.cuda.is_available())
        if overrides:
            lines += _device_lines(trainer, overrides)
    missing = missing_weights(config, model_init_from=training)
    if missing:
        lines += [
            f"{len(missing)} path(s) this config loads are missing. Nothing is downloaded at run "
            "time:",
            "  run these commands on a machine with internet, or point the flags at your copies:",
        ]
        for entry in missing:
            lines += entry.lines()
    if lines:
        raise UserError("\n".join(lines))
