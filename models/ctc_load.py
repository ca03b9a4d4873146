"""Rebuild a CTC model from its checkpoint alone (its vocabulary and tower description)."""

from __future__ import annotations

from pathlib import Path

from mmpt.models.ctc import CTCModule
from mmpt.models.encoders.wav2vec2 import Wav2Vec2Tower
from mmpt.safe_load import load_tensors


def load_ctc(path: str, flag: str = "--ckpt") -> CTCModule:
    """A :class:`CTCModule` (or wav2vec-S run) as a CTC model, weights loaded, in eval mode.

    The checkpoint's ``hyper_parameters`` hold the vocabulary and the tower's
    ``class_path``/``init_args`` (HF config, no weights path), so no training config is needed.

    Args:
        path: A Lightning ``.ckpt`` of ``CTCModule`` or ``WavSModule``.
        flag: The option that gave ``path``, named in errors.

    Raises:
        FileNotFoundError: No file at ``path``.
        ValueError: Not a CTC checkpoint, or its weights do not fit the rebuilt model.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag}: no checkpoint at {path!r}")
    ckpt = load_tensors(path)
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "vocab" not in hparams or "encoder" not in hparams:
        raise ValueError(
            f"{flag}={path}: not a CTC checkpoint (no vocabulary and encoder in its "
            "hyper_parameters); train one with mmpt.models.ctc.CTCModule"
        )
    init_args = dict(hparams["encoder"]["init_args"])
    model = CTCModule(Wav2Vec2Tower(**init_args), hparams["vocab"])
    state = ckpt["state_dict"]
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise ValueError(
            f"{flag}={path}: {len(result.missing_keys)} weights of the CTC model are missing "
            f"(first: {result.missing_keys[:3]})"
        )
    return model.eval()


__all__ = ["load_ctc"]
