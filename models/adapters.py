"""``model.adapters``: LoRA, DoRA and (IA)^3 from peft on chosen modules of any mmpt model.

A recipe lists adapters by glob over module names; peft's ``inject_adapter_in_model`` puts its
own layers in place of the matched ``nn.Linear`` (or ``Conv``/``Embedding``) modules, keeping
every other parameter name. The adapter parameters then train and everything else is frozen
(a ``trainable:`` list adds more, e.g. the connector)::

    model:
      init_args:
        adapters:
          - {kind: lora, targets: ["llm.*.q_proj", "llm.*.v_proj"], r: 8, alpha: 16}
          - {kind: ia3, targets: ["vision.*.fc2"], feedforward: ["vision.*.fc2"]}

Checkpoints hold the peft layers' names (``...q_proj.base_layer.weight``,
``...q_proj.lora_A.default.weight``): a run resumes as any other, ``init_from`` loads plain
base weights before the adapters are added, and :func:`merge_adapters` folds them back into
plain modules with peft's own ``merge`` (what ``mmpt export`` does by default).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Literal

import lightning as L
import torch
from torch import nn

#: The adapter name every spec injects under (one peft adapter per model, as PeftModel saves).
ADAPTER_NAME = "default"
_FLAG = "model.init_args.adapters"


@dataclass
class AdapterSpec:
    """One group of adapters (one YAML entry of ``model.adapters``).

    Attributes:
        targets: fnmatch patterns over module names (``llm.*.q_proj``, ``vision.*.qkv``); ``*``
            crosses dots. Each must match at least one module peft can adapt (``nn.Linear``,
            ``nn.Conv1d/2d/3d``, ``nn.Embedding``, transformers ``Conv1D``).
        kind: ``lora``, ``dora`` (LoRA with a learned magnitude, Liu et al. 2024) or ``ia3``
            (learned scaling vectors, Liu et al. 2022).
        r: LoRA/DoRA rank.
        alpha: LoRA/DoRA scale numerator (the update is ``alpha / r * B @ A``).
        dropout: Dropout on the LoRA/DoRA input.
        feedforward: (IA)^3 only: patterns among ``targets`` whose input (not output) is scaled,
            as the paper does for the feed-forward output projection.
    """

    targets: list[str]
    kind: Literal["lora", "dora", "ia3"] = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    feedforward: list[str] = field(default_factory=list)


def adaptable_types() -> tuple[type, ...]:
    """Module types peft's LoRA, DoRA and (IA)^3 layers wrap."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, Conv1D)


def _near(pattern: str, names: list[str], limit: int = 5) -> list[str]:
    """Module names (and their digit-free generalisations) close to ``pattern``."""
    general = sorted({re.sub(r"\.\d+\.", ".*.", n) for n in names})
    return difflib.get_close_matches(pattern, general + names, n=limit, cutoff=0.4)


def resolve_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Full names of the adaptable modules matching any of ``patterns``.

    Args:
        model: The model the patterns name modules of.
        patterns: fnmatch patterns (``*`` crosses dots).

    Returns:
        Module names in model order.

    Raises:
        ValueError: A pattern matches no adaptable module; the message lists near matches.
    """
    kinds = adaptable_types()
    names = [n for n, m in model.named_modules() if n and isinstance(m, kinds)]
    found: dict[str, None] = {}
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            near = _near(pattern, names)
            raise ValueError(
                f"{_FLAG}: target {pattern!r} matches no Linear/Conv/Embedding module of "
                f"{type(model).__name__}; near matches: {near or sorted(names)[:5]}"
            )
        found.update(dict.fromkeys(hits))
    bypassed = [n for n in found if _inside_attention(model, n)]
    if bypassed:
        raise ValueError(
            f"{_FLAG}: {bypassed[:3]} are the out_proj of torch's nn.MultiheadAttention, whose "
            "forward reads the weight directly, so an adapter there would never run; target "
            "the MLP layers (e.g. '*.mlp.c_fc', '*.mlp.c_proj') of those blocks instead"
        )
    return [n for n in names if n in found]


def _inside_attention(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is a projection torch's ``nn.MultiheadAttention`` never calls."""
    parent = name.rpartition(".")[0]
    return isinstance(model.get_submodule(parent), nn.MultiheadAttention)


def peft_config(spec: AdapterSpec, modules: list[str], feedforward: list[str] | None = None):
    """The peft config of ``spec`` on the exact module names ``modules``.

    Returns:
        A ``LoraConfig`` (``use_dora`` for DoRA) or an ``IA3Config``.
    """
    from peft import IA3Config, LoraConfig

    if spec.kind == "ia3":
        return IA3Config(target_modules=modules, feedforward_modules=list(feedforward or []))
    return LoraConfig(
        target_modules=modules,
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        use_dora=spec.kind == "dora",
    )


def add_adapters(model: nn.Module, specs: list[AdapterSpec]) -> list[str]:
    """Inject the peft layers of ``specs`` into ``model`` (in place).

    Raises:
        ValueError: A target pattern matches nothing, a module is targeted twice, or an (IA)^3
            ``feedforward`` pattern is not among its targets.

    Returns:
        The adapted module names.
    """
    # Lightning's ModelParallelStrategy (FSDP2) sets ``_device_mesh`` on the module; peft would
    # take it for a transformers tensor-parallel mesh and read a ``config`` the module lacks
    mesh = getattr(model, "_device_mesh", None)
    if mesh is not None:
        model._device_mesh = None
    try:
        return _inject(model, specs)
    finally:
        if mesh is not None:
            model._device_mesh = mesh


def _inject(model: nn.Module, specs: list[AdapterSpec]) -> list[str]:
    from peft import inject_adapter_in_model

    done: list[str] = []
    for spec in specs:
        modules = resolve_targets(model, spec.targets)
        twice = sorted(set(modules) & set(done))
        if twice:
            raise ValueError(f"{_FLAG}: modules targeted by two entries: {twice[:5]}")
        feedforward = resolve_targets(model, spec.feedforward) if spec.feedforward else []
        if spec.kind != "ia3" and feedforward:
            raise ValueError(f"{_FLAG}: feedforward applies to kind ia3 only, not {spec.kind}")
        stray = sorted(set(feedforward) - set(modules))
        if stray:
            raise ValueError(f"{_FLAG}: feedforward modules not among the targets: {stray[:5]}")
        inject_adapter_in_model(peft_config(spec, modules, feedforward), model, ADAPTER_NAME)
        vars(model).pop("peft_config", None)  # peft's note of the config: the specs hold it
        done += modules
    return done


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The peft layers of ``model`` by module name (empty without adapters)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def adapter_parameter_names(model: nn.Module) -> set[str]:
    """Names of the adapter parameters (LoRA A/B, DoRA magnitudes, (IA)^3 vectors)."""
    names = set()
    for prefix, layer in adapter_layers(model).items():
        for attr in layer.adapter_layer_names:
            for sub, _ in getattr(layer, attr).named_parameters():
                names.add(f"{prefix}.{attr}.{sub}")
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def merge_adapters(model: nn.Module, merge: bool = True) -> list[str]:
    """Replace every peft layer by its base module, merged (peft's ``merge``) or not.

    Args:
        model: A model with adapters (in place).
        merge: Fold the adapter into the base weights first; False drops it (the base model).

    Returns:
        The names of the modules that held adapters.
    """
    layers = adapter_layers(model)
    for name, layer in layers.items():
        if merge:
            layer.merge(safe_merge=True)
        _replace(model, name, layer.get_base_layer())
    return list(layers)


class MergeAdapters(L.Callback):
    """LoRA + merge: fold the LoRA update into the base weights and restart the adapter.

    Every ``every_n_epochs`` training epochs (after that epoch's validation) each LoRA layer's
    update ``alpha / r * B @ A`` (peft's ``get_delta_weight``) is added to its base weight,
    then peft re-initialises the adapter (B = 0: the model's function is unchanged) and the
    optimizer forgets its moments. The run thus accumulates several low-rank updates in the
    base weights, while only the adapter trains at any time. Plain LoRA only: a DoRA magnitude
    and an (IA)^3 scale are not additive.

    Args:
        every_n_epochs: Merge after every n-th training epoch.
    """

    def __init__(self, every_n_epochs: int = 1) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"MergeAdapters every_n_epochs must be >= 1, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse a model without adapters, or with adapters that do not add to the base."""
        specs = getattr(pl_module, "adapter_specs", [])
        if not specs or any(s.kind != "lora" for s in specs):
            raise ValueError(
                "mmpt.models.adapters.MergeAdapters needs model.adapters of kind lora only "
                f"(got {[s.kind for s in specs] or 'none'})"
            )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Merge and restart every LoRA layer (see the class docstring)."""
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        state = trainer.optimizers[0].state if trainer.optimizers else {}
        with torch.no_grad():
            for layer in adapter_layers(pl_module).values():
                base = layer.get_base_layer()
                base.weight.add_(layer.get_delta_weight(ADAPTER_NAME).to(base.weight.dtype))
                layer.reset_lora_parameters(ADAPTER_NAME, True)
                for attr in layer.adapter_layer_names:
                    for p in getattr(layer, attr).parameters():
                        state.pop(p, None)
