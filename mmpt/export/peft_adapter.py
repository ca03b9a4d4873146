"""``mmpt export --no-merge``: the base model in the target format plus a peft adapter folder.

The adapted model's peft layers are dropped (the base weights stay), the base is exported as
usual, loaded back in its library (transformers or open_clip), and each adapted mmpt module
is found in it by its base weight (equal values, one match). peft's own ``get_peft_model``
then puts the same adapters on those modules, the trained values are copied in, and
``save_pretrained`` writes ``OUT/adapter``, which loads with::

    base = LlavaForConditionalGeneration.from_pretrained(OUT)  # or open_clip "local-dir:OUT"
    model = PeftModel.from_pretrained(base, OUT / "adapter")
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mmpt.models.adapters import adaptable_types, adapter_layers, merge_adapters

ADAPTER_DIR = "adapter"
#: Formats whose exported base :func:`load_exported` loads back (``--no-merge`` works for them).
UNMERGED_FORMATS = ("llava", "open_clip", "hf")


def load_exported(fmt: str, folder: Path) -> nn.Module:
    """The exported base model, loaded by its own library (``llava``, ``open_clip``, ``hf``).

    Raises:
        ValueError: A format with no adapter export (``--no-merge``).
    """
    if fmt == "llava":
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration.from_pretrained(str(folder)).eval()
    if fmt == "open_clip":
        import open_clip

        return open_clip.create_model(f"local-dir:{folder}").eval()
    if fmt == "hf":
        from transformers import AutoModel

        return AutoModel.from_pretrained(str(folder)).eval()
    raise ValueError(
        f"--no-merge: format {fmt} has no peft adapter export ({', '.join(UNMERGED_FORMATS)} "
        "have); drop --no-merge to merge the adapters into the weights"
    )


def _find(base: nn.Module, weight: torch.Tensor, name: str) -> str:
    """The one adaptable module of ``base`` whose weight equals ``weight``."""
    kinds = adaptable_types()
    hits = [
        n
        for n, m in base.named_modules()
        if isinstance(m, kinds)
        and m.weight.shape == weight.shape
        and torch.equal(m.weight.detach(), weight.to(m.weight.dtype))
    ]
    if len(hits) != 1:
        raise ValueError(
            f"--no-merge: the adapted module {name} matches {len(hits)} modules of the exported "
            f"model by weight ({hits[:3]}), not one; export merged (drop --no-merge)"
        )
    return hits[0]


def _config(layers: dict[str, nn.Module], names: dict[str, str]):
    """One peft config for every layer (peft saves one adapter); per-module ranks as patterns."""
    from peft import IA3Config, LoraConfig
    from peft.tuners.ia3 import IA3Layer

    kinds = sorted({type(layer).__name__ for layer in layers.values()})
    if all(isinstance(layer, IA3Layer) for layer in layers.values()):
        feedforward = [names[n] for n, layer in layers.items() if layer.is_feedforward]
        return IA3Config(target_modules=list(names.values()), feedforward_modules=feedforward)
    dora = {bool(layer.use_dora["default"]) for layer in layers.values()}
    if any(isinstance(layer, IA3Layer) for layer in layers.values()) or len(dora) > 1:
        raise ValueError(
            f"--no-merge writes one peft adapter, and the model mixes adapter kinds ({kinds}); "
            "export merged (drop --no-merge)"
        )
    first = next(iter(layers.values()))
    dropout = first.lora_dropout["default"]
    return LoraConfig(
        target_modules=list(names.values()),
        r=int(first.r["default"]),
        lora_alpha=first.lora_alpha["default"],
        lora_dropout=float(getattr(dropout, "p", 0.0)),
        use_dora=dora.pop(),
        rank_pattern={re.escape(names[n]): int(x.r["default"]) for n, x in layers.items()},
        alpha_pattern={re.escape(names[n]): x.lora_alpha["default"] for n, x in layers.items()},
    )


def export_unmerged(
    model: nn.Module, out: Path, export: Callable[[nn.Module], Path], fmt: str
) -> Path:
    """Export ``model``'s base with ``export`` and its adapters as a peft folder beside it.

    Args:
        model: An adapted model (its peft layers are removed, in place).
        out: The export folder (the adapter goes to ``out/adapter``).
        export: Writes the base model in the target format; returns the folder.
        fmt: The target (``llava``, ``open_clip``, ``hf``), to load the base back.

    Returns:
        The adapter folder.

    Raises:
        ValueError: A format without adapter export, mixed adapter kinds, or an adapted module
            not found once in the exported model.
    """
    from peft import get_peft_model

    layers = adapter_layers(model)
    weights = {n: layer.get_base_layer().weight.detach().clone() for n, layer in layers.items()}
    merge_adapters(model, merge=False)
    folder = export(model)
    base = load_exported(fmt, folder)
    names = {n: _find(base, w, n) for n, w in weights.items()}
    peft_model = get_peft_model(base, _config(layers, names))
    with torch.no_grad():
        for name, layer in layers.items():
            theirs = peft_model.base_model.model.get_submodule(names[name])
            for attr in layer.adapter_layer_names:
                mine = dict(getattr(layer, attr).named_parameters())
                for sub, p in getattr(theirs, attr).named_parameters():
                    p.copy_(mine[sub])
    adapter = Path(out) / ADAPTER_DIR
    peft_model.save_pretrained(str(adapter))
    return adapter
