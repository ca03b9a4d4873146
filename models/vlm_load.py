"""Read an ``mmpt-vlm/3`` export folder back: the exact :class:`VLMModule`, or its state dict."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from mmpt.models.vlm_export import CONFIG_NAME, FORMAT, LLM_DIR, PARTS, TOKENIZER_DIR

if TYPE_CHECKING:
    from mmpt.models.vlm import VLMModule

log = logging.getLogger("mmpt.vlm")


def read_export_config(path: str | Path) -> dict[str, Any]:
    """The checked ``mmpt_vlm.json`` of an export folder.

    Raises:
        FileNotFoundError: No such folder, or a file the config needs is missing (named).
        ValueError: Not an mmpt export (says what the folder looks like), or another format
            version (names the one found and the one supported).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(folder)!r} is not a folder (expected an mmpt export)")
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise ValueError(f"{str(folder)!r} is not an mmpt export: {_describe_foreign(folder)}")
    config = json.loads(config_file.read_text())
    found = config.get("format")
    if found != FORMAT:
        raise ValueError(
            f"{config_file} has format {found!r}; this mmpt loads {FORMAT!r} only (and "
            "transformers LLaVA folders): re-export the checkpoint with `mmpt export`"
        )
    needed = [f"{LLM_DIR}/config.json", f"{TOKENIZER_DIR}/tokenizer_config.json"]
    needed += [f"{p}.safetensors" for p in PARTS if config.get(p) is not None]
    if not list((folder / LLM_DIR).glob("*.safetensors")):
        needed.append(f"{LLM_DIR}/model.safetensors")
    for name in needed:
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder / name} is missing from the mmpt export {str(folder)!r}: copy the "
                "whole folder, or export it again"
            )
    return config


def _describe_foreign(folder: Path) -> str:
    """What a folder without ``mmpt_vlm.json`` holds, for the error."""
    hf = folder / "config.json"
    if hf.is_file():
        try:
            model_type = json.loads(hf.read_text()).get("model_type")
        except json.JSONDecodeError:
            model_type = None
        what = f"a transformers folder (model_type {model_type!r})"
    else:
        names = sorted(p.name for p in folder.iterdir())[:5]
        what = f"no {CONFIG_NAME} (found: {names})"
    return (
        f"{what}. Loadable: mmpt exports ({CONFIG_NAME} with format {FORMAT!r}, written by "
        "`mmpt export`) and transformers LLaVA folders"
    )


def import_class(path: str, what: str) -> type:
    """The class named by an export's ``class_path`` (only ``mmpt.`` classes load).

    Raises:
        ValueError: A class outside mmpt, or one that does not exist.
    """
    module, _, name = path.rpartition(".")
    if not path.startswith("mmpt."):
        raise ValueError(f"{what}: class_path {path!r} is not an mmpt class; refusing to load it")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{what}: class_path {path!r} does not exist in this mmpt") from err
    if not inspect.isclass(cls):
        raise ValueError(f"{what}: class_path {path!r} is not a class")
    return cls


def _build(spec: dict[str, Any], what: str) -> Any:
    return import_class(spec["class_path"], what)(**spec.get("init_args", {}))


def _factory(spec: dict[str, Any], what: str) -> partial:
    """``(in_dim, llm_dim) -> module`` of a connector/adapter spec (the module passes widths)."""
    cls = import_class(spec["class_path"], what)
    widths = list(inspect.signature(cls.__init__).parameters)[1:3]
    return partial(cls, **{k: v for k, v in spec["init_args"].items() if k not in widths})


def load_export(path: str | Path, attn_implementation: str | None = None) -> VLMModule:
    """Rebuild the exact model of an ``mmpt-vlm/3`` folder (eval mode, on the CPU).

    Args:
        path: The export folder.
        attn_implementation: The LLM's attention; default the one it trained with.

    Returns:
        The model, its weights loaded strictly, ``data_template`` set from the export.

    Raises:
        FileNotFoundError, ValueError: See :func:`read_export_config`.
    """
    from mmpt.models.llm import CausalLM
    from mmpt.models.vlm import FusionConfig, VLMModule

    folder = Path(path)
    config = read_export_config(folder)
    llm_cfg = config["llm"]
    impl = attn_implementation or llm_cfg.get("attn_implementation") or "packed"
    backend = "auto"
    if impl.startswith("mmpt_packed"):  # mmpt_packed[_<backend>]: registered by CausalLM
        impl, backend = "packed", impl.removeprefix("mmpt_packed").lstrip("_") or "auto"
    llm = CausalLM(
        pretrained=str(folder / llm_cfg.get("folder", LLM_DIR)),
        tokenizer=str(folder / llm_cfg.get("tokenizer", TOKENIZER_DIR)),
        image_token=llm_cfg["image_token"],
        attn_implementation=impl,
        attn_backend=backend,
    )
    kwargs: dict[str, Any] = {
        "val_shuffled_images": config.get("val_shuffled_images", True),
        "val_no_audio": config.get("val_no_audio", True),
    }
    if config.get("vision") is not None:
        kwargs["vision"] = _build(config["vision"], "vision")
        kwargs["connector"] = _factory(config["connector"], "connector")
        kwargs["resolution"] = _build(config["resolution"], "resolution")
        if config.get("fusion") is not None:
            kwargs["fusion"] = FusionConfig(**config["fusion"])
    if config.get("audio") is not None:
        kwargs["audio"] = _build(config["audio"], "audio")
        kwargs["audio_adapter"] = _factory(config["audio_adapter"], "audio_adapter")
        kwargs["audio_token"] = config["audio_token"]
    model = VLMModule(llm, **kwargs)
    for name in PARTS:
        if config.get(name) is not None:
            getattr(model, name).load_state_dict(load_file(folder / f"{name}.safetensors"))
    model.data_template = config.get("template")
    log.info("loaded %s export %s", FORMAT, folder)
    return model.eval()


def export_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """An export folder's weights under the module's state-dict names (for ``init_from``).

    The LLM's are ``llm.model.*`` (a tied output head is left out: tying restores it), the
    other parts ``vision.*``, ``connector.*``, ``fusion.*``, ``audio.*``, ``audio_adapter.*``.

    Raises:
        FileNotFoundError, ValueError: See :func:`read_export_config`.
    """
    folder = Path(path)
    config = read_export_config(folder)
    state: dict[str, torch.Tensor] = {}
    for file in sorted((folder / config["llm"].get("folder", LLM_DIR)).glob("*.safetensors")):
        state |= {f"llm.model.{k}": v for k, v in load_file(file).items()}
    for name in PARTS:
        if config.get(name) is not None:
            part = load_file(folder / f"{name}.safetensors")
            state |= {f"{name}.{k}": v for k, v in part.items()}
    return state
