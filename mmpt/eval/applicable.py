"""Which ``mmpt eval`` tasks (and ``mmpt generate``) a model can run, and the error if not."""

from __future__ import annotations

from torch import nn

#: The methods each ``mmpt eval`` task calls on the model built from the config.
NEEDS: dict[str, tuple[str, ...]] = {
    "retrieval": ("encode_media", "encode_text"),
    "zeroshot": ("encode_media", "encode_text"),
    "mcq": ("encode_video", "encode_text"),
    "mir": ("encode_video", "encode_text"),
    "univl": ("generate_captions", "alignment_scores"),
}
#: The models that have them, as the error says it.
_KINDS = {"mcq": "a video-text model", "mir": "a video-text model", "univl": "a UniVL model"}
_DEFAULT_KIND = "an image- or audio-text contrastive model"


def applicable_commands(model: nn.Module) -> list[str]:
    """The ``mmpt`` commands that take ``model``'s checkpoint, e.g. ``["eval retrieval", ...]``.

    Args:
        model: The LightningModule built from the training config.

    Returns:
        ``eval <task>`` for every task of :data:`NEEDS` whose methods ``model`` has, ``eval
        probe`` for a model with an image tower, and ``generate`` and the VLM benchmarks
        (``eval caption|vqa|choice|all``) for a model with an LLM.
    """
    out = [f"eval {task}" for task, needs in NEEDS.items() if all(hasattr(model, m) for m in needs)]
    if hasattr(getattr(model, "vision", None), "pooled_features"):
        out.append("eval probe")
    if hasattr(model, "llm"):
        out += ["generate", "eval caption|vqa|choice|all"]
    return out


def require_task(model: nn.Module, task: str, ckpt: str) -> None:
    """Raise a clear error when ``model`` cannot run ``mmpt eval task``.

    Args:
        model: The LightningModule built from the training config.
        task: An ``mmpt eval`` task of :data:`NEEDS`.
        ckpt: The ``--ckpt`` value, quoted in the error.

    Raises:
        ValueError: Naming the checkpoint's model family and the commands that apply to it.
    """
    missing = [m for m in NEEDS.get(task, ()) if not hasattr(model, m)]
    if not missing:
        return
    from mmpt.models.init_sources import family_of

    family = family_of([k for k, _ in model.named_parameters()])
    others = ", ".join(f"`mmpt {c}`" for c in applicable_commands(model)) or "none of mmpt's"
    raise ValueError(
        f"--ckpt {ckpt}: a {family} model ({type(model).__name__}) has no "
        f"{'/'.join(missing)}, which `mmpt eval {task}` needs "
        f"({_KINDS.get(task, _DEFAULT_KIND)}). Commands for this checkpoint: {others}."
    )
