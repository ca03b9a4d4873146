"""Analytic training FLOPs per batch, counted per architecture from the modules and batch shapes.

Conventions (PaLM appendix B / Chinchilla), per training step:

- a matmul weight of P parameters applied to T tokens costs ``2 P T`` forward, ``2 P T`` for
  the weight gradient (only when it trains) and ``2 P T`` for the input gradient (only when
  something before it trains): ``6 P T`` for a fully trained layer, ``2 P T`` for a frozen tower
  nothing upstream of which trains, ``4 P T`` for a frozen LLM under a trained connector;
- self-attention scores and mixing cost ``4 s^2 w`` forward per sequence of length s and
  attention width w (Q K^T and A V), ``8 s^2 w`` backward: ``12 * layers * s^2 * w`` trained;
- a convolution costs ``2 * (C_in / groups * prod(kernel)) * C_out`` per output position.

Matmul weights are ``nn.Linear`` weights and ``nn.MultiheadAttention`` input projections;
embedding look-ups, norms, activations and losses are not counted (a few % of a transformer).
Padding is counted where the model computes on it (fixed-length captions, padded waveforms),
but not in packed VLM rows: the LLM counts ``num_real_tokens`` (the model FLOPs of MFU) and its
attention sums ``seg_len^2`` over the ``cu_seqlens`` segments. :func:`measured_flops` checks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Stage:
    """Forward FLOPs of one module group of a model, and whether gradients reach it.

    Attributes:
        matmul: Forward matmul and convolution FLOPs of all its weights.
        matmul_trainable: The part of ``matmul`` whose weights train.
        first: Forward FLOPs of its first matmul (no input gradient when nothing upstream trains).
        attention: Forward attention FLOPs (``4 * sum_layers(w) * sum_seqs(s^2)``).
        trains: Whether any of its parameters trains.
    """

    matmul: float = 0.0
    matmul_trainable: float = 0.0
    first: float = 0.0
    attention: float = 0.0
    trains: bool = False


def stage_train_flops(stages: Iterable[Stage]) -> float:
    """Forward + backward FLOPs of module groups run one after the other.

    A group's input gradient is computed when an earlier group trains (all of it) or when it
    trains itself (all but its first matmul). Weight gradients cost ``matmul_trainable``.

    Args:
        stages: Groups in execution order (one branch: e.g. vision -> connector -> LLM).

    Returns:
        FLOPs of one training step through the branch.
    """
    total, upstream = 0.0, False
    for s in stages:
        total += s.matmul + s.attention + s.matmul_trainable
        if upstream:
            total += s.matmul + 2 * s.attention
        elif s.trains:
            total += s.matmul - s.first + 2 * s.attention
        upstream = upstream or s.trains
    return total


def _attention_width(module: nn.Module) -> int:
    """Attention width (query projection outputs) of one attention module, 0 if not one."""
    if isinstance(module, nn.MultiheadAttention):
        return int(module.embed_dim)
    for name in ("q_proj", "query"):  # HF (Qwen2, Llama, CLIP, SigLIP, wav2vec2), BERT
        proj = getattr(module, name, None)
        if isinstance(proj, nn.Linear):
            return int(proj.out_features)
    qkv = getattr(module, "qkv", None)  # timm Attention
    if isinstance(qkv, nn.Linear) and hasattr(module, "num_heads"):
        return int(qkv.out_features // 3)
    return 0


def _modules(parts: nn.Module | Iterable[nn.Module]) -> list[nn.Module]:
    """Distinct submodules of one or several modules, in registration order."""
    parts = [parts] if isinstance(parts, nn.Module) else list(parts)
    seen: dict[int, nn.Module] = {}
    for part in parts:
        for m in part.modules():
            seen.setdefault(id(m), m)
    return list(seen.values())


def dense_stage(
    parts: nn.Module | Iterable[nn.Module],
    tokens: float,
    seqs: Iterable[tuple[float, float]] = (),
    attention_parts: nn.Module | Iterable[nn.Module] | None = None,
) -> Stage:
    """Matmul and attention FLOPs of transformer-like modules applied to every token.

    Args:
        parts: Module(s) whose ``nn.Linear`` / ``nn.MultiheadAttention`` weights all act on
            every one of ``tokens``.
        tokens: Tokens each weight is applied to (batch x sequence length, summed).
        seqs: ``(count, length)`` pairs of the attended sequences (e.g. ``(B, L)``).
        attention_parts: Modules whose attention layers attend over ``seqs`` (default:
            ``parts``).

    Returns:
        The :class:`Stage` (``2 P T`` matmul, ``4 * sum(w) * sum(count * length^2)``).
    """
    mods = _modules(parts)
    stage = Stage(trains=any(p.requires_grad for m in mods for p in m.parameters(False)))
    for m in mods:
        weights: list[torch.Tensor] = []
        if isinstance(m, nn.Linear):
            weights = [m.weight]
        elif isinstance(m, nn.MultiheadAttention):
            weights = [w for w in (m.in_proj_weight, m.q_proj_weight) if w is not None]
            if m.k_proj_weight is not None:
                weights += [m.k_proj_weight, m.v_proj_weight]
        for w in weights:
            flops = 2.0 * w.numel() * tokens
            stage.first = stage.first or flops
            stage.matmul += flops
            stage.matmul_trainable += flops if w.requires_grad else 0.0
    att = _modules(parts if attention_parts is None else attention_parts)
    width = sum(_attention_width(m) for m in att)
    stage.attention = 4.0 * width * sum(n * s * s for n, s in seqs)
    return stage


def conv_stage(module: nn.Module, batch: int, size: tuple[int, ...]) -> Stage:
    """FLOPs of the convolutions of ``module``, chained in registration order.

    Every ``Conv1d`` takes the previous one's output length (a front-end: wav2vec 2.0's
    feature encoder, log-mel subsampling); every ``Conv2d`` / ``Conv3d`` takes ``size`` (a
    patch embedding).

    Args:
        module: Module holding the convolutions.
        batch: Inputs B.
        size: Input length ``(N,)`` for 1-d, ``(H, W)`` or ``(T, H, W)`` for 2-d / 3-d.

    Returns:
        The :class:`Stage`: ``2 * B * (C_in / groups * prod(k)) * C_out * prod(out_size)``.
    """
    stage, length = Stage(), size[0]
    for m in module.modules():
        if not isinstance(m, nn.modules.conv._ConvNd) or isinstance(m.padding, str):
            continue
        dims = len(m.kernel_size)
        inp = (length,) if dims == 1 else size[-dims:]
        out = [
            (i + 2 * p - d * (k - 1) - 1) // s + 1
            for i, p, d, k, s in zip(
                inp, m.padding, m.dilation, m.kernel_size, m.stride, strict=True
            )
        ]
        if dims == 1:
            length = out[0]
        positions = batch * float(torch.tensor(out).prod())
        flops = 2.0 * m.weight.numel() * positions
        stage.first = stage.first or flops
        stage.matmul += flops
        stage.matmul_trainable += flops if m.weight.requires_grad else 0.0
        stage.trains = stage.trains or m.weight.requires_grad
    return stage


# ---- towers ---------------------------------------------------------------------------------


def _prefix_tokens(tower: nn.Module) -> int:
    return int(getattr(getattr(tower, "model", tower), "num_prefix_tokens", 1))


def _image_tokens(tower: nn.Module, height: int, width: int) -> int:
    """Patch tokens of one (height, width) image: the grid plus class/register tokens."""
    conv = next((m for m in tower.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:  # no patch embedding: one token per image
        return 1
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    return ((height - kh) // sh + 1) * ((width - kw) // sw + 1) + _prefix_tokens(tower)


def image_tower_stages(
    tower: nn.Module, images: Sequence[int], features: bool = False
) -> list[Stage]:
    """Stages of an image tower (timm / open_clip / HF ViT) on (B, C, H, W) images.

    With ``features`` (``patch_features``) a timm tower runs only blocks ``0..feature_layer``.
    """
    b, _, h, w = images
    n = _image_tokens(tower, h, w)
    body: Any = tower
    vit = getattr(tower, "model", None)
    index = getattr(tower, "_layer_index", None)
    if features and index is not None and hasattr(vit, "blocks"):
        body = [vit.blocks[i] for i in range(index + 1)]
    return [conv_stage(tower, b, (h, w)), dense_stage(body, b * n, [(b, n)])]


def video_tower_stages(tower: nn.Module, videos: Sequence[int]) -> list[Stage]:
    """Stages of :class:`~mmpt.models.encoders.VideoViTTower` on (B, T, C, H, W) clips.

    Spatial attention over ``L = patches + prefix`` per frame, temporal attention over T per
    token position; every weight acts on ``B * T * L`` tokens.
    """
    b, t, _, h, w = videos
    n = _image_tokens(tower, h, w)
    spatial = dense_stage(tower.model, b * t * n, [(b * t, n)])
    temporal = dense_stage(tower.temporal, b * t * n, [(b * n, t)])
    return [conv_stage(tower.model, b * t, (h, w)), spatial, temporal]


def audio_tower_stages(tower: nn.Module, audio: Sequence[int]) -> list[Stage]:
    """Stages of a speech tower (wav2vec 2.0, log-mel transformer) on (B, N) waveforms.

    The conv front-end runs on the waveform (wav2vec 2.0, first conv has one input channel)
    or on the ``N // hop + 1`` mel frames (log-mel subsampling); the transformer on
    ``T = tower.lengths(N)`` frames per clip.
    """
    b, n = audio
    frames = int(tower.lengths(n))
    convs = [m for m in tower.modules() if isinstance(m, nn.Conv1d)]
    start = n if not convs or convs[0].in_channels == 1 else int(tower._stft(n))
    return [conv_stage(tower, b, (start,)), dense_stage(tower, b * frames, [(b, frames)])]


def text_tower_stages(tower: nn.Module, tokens: Sequence[int]) -> list[Stage]:
    """Stages of a text tower on (M, L) token ids (fixed-length: padding is computed)."""
    m, length = tokens
    return [dense_stage(tower, m * length, [(m, length)])]


# ---- families -------------------------------------------------------------------------------


def _vlm_flops(model: nn.Module, batch: Any) -> float:
    """Vision -> connector -> LLM (and speech -> adapter -> LLM) on packed rows."""
    pre: list[Stage] = []
    if getattr(model, "vision", None) is not None and batch.pixels:
        for pixels in batch.pixels:
            b, _, h, w = pixels.shape
            pre += image_tower_stages(model.vision, pixels.shape, features=True)
            patches = b * (_image_tokens(model.vision, h, w) - _prefix_tokens(model.vision))
            pre.append(dense_stage(model.connector, patches))
    if getattr(model, "audio", None) is not None and getattr(batch, "audio", None) is not None:
        pre += audio_tower_stages(model.audio, batch.audio.shape)
        frames = batch.audio.shape[0] * int(model.audio.lengths(batch.audio.shape[1]))
        pre.append(dense_stage(model.audio_adapter, frames))
    tokens = batch.num_real_tokens or batch.input_ids.numel()
    seqs = [(1.0, float(s)) for s in batch.cu_seqlens.diff().tolist()] or [batch.input_ids.shape]
    llm = dense_stage(model.llm, tokens, seqs)
    # each pixel group (vision -> connector) and the speech branch (tower -> adapter) is its
    # own chain of three stages; gradients enter the LLM's input when any of them trains
    total = sum(stage_train_flops(pre[i : i + 3]) for i in range(0, len(pre), 3))
    upstream = any(s.trains for s in pre)
    return total + stage_train_flops([Stage(trains=upstream), llm])


def train_flops(model: nn.Module, batch: Any) -> float:
    """Analytic FLOPs of one training step (forward + backward) of ``model`` on ``batch``.

    Dispatches on the model's attributes: VLM (``llm`` and a packed batch), MAE (``decoder``
    and ``mask_ratio``), wav2vec 2.0 pretraining (``encoder`` with ``lengths``), dual
    encoders (``text`` with ``vision`` or ``audio``; video towers have ``temporal``).

    Args:
        model: A training module of one of the mmpt families.
        batch: Its training batch (``VLMBatch``, ``ImageTextBatch``, ...; MAE also takes an
            ``ImageBatch`` or a (B, C, H, W) tensor).

    Returns:
        FLOPs (a float, not per second).

    Raises:
        TypeError: The model or batch is of no known family.
    """
    if hasattr(model, "llm") and hasattr(batch, "cu_seqlens"):
        return _vlm_flops(model, batch)
    if hasattr(model, "decoder") and hasattr(model, "mask_ratio"):
        images = getattr(batch, "images", batch)
        b, _, h, w = images.shape
        enc, prefix = model.encoder, _prefix_tokens(model.encoder)
        n = _image_tokens(enc, h, w) - prefix
        groups = len(getattr(model, "band_groups", None) or ()) or 1
        n *= groups  # SatMAE: one token per band group and patch
        visible = int(n * (1 - model.mask_ratio)) + prefix
        stages = [
            conv_stage(enc, b, (h, w)),
            dense_stage(enc, b * visible, [(b, visible)]),
            dense_stage(model.decoder, b * (n + prefix), [(b, n + prefix)]),
        ]
        return stage_train_flops(stages)
    if hasattr(model, "encoder") and hasattr(model.encoder, "lengths"):
        return stage_train_flops(audio_tower_stages(model.encoder, batch.audio.shape))
    if hasattr(model, "text") and hasattr(batch, "text_tokens"):
        if getattr(model, "audio", None) is not None:
            media = audio_tower_stages(model.audio, batch.audio.shape)
        elif hasattr(model.vision, "temporal"):
            media = video_tower_stages(model.vision, batch.videos.shape)
        else:
            media = image_tower_stages(model.vision, batch.images.shape)
        text = text_tower_stages(model.text, batch.text_tokens.shape)
        return stage_train_flops(media) + stage_train_flops(text)
    raise TypeError(f"no FLOP count for {type(model).__name__} on {type(batch).__name__}")


def _cpu_attention_formulas() -> dict:
    """``FlopCounterMode`` formulas for the CPU fused attention, which torch does not count."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def forward(query, key, value, *args: Any, **kwargs: Any) -> int:
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args: Any, **kwargs: Any) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    return {
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    }


def measured_flops(model: nn.Module, batch: Any) -> float:
    """FLOPs of one ``model.training_step`` forward + backward under ``FlopCounterMode``.

    Counts every matmul, convolution and attention kernel PyTorch dispatches (padding and
    masked-out attention included; the CPU fused attention kernel is added to torch's
    formulas); for validating :func:`train_flops` on small models. Leaves gradients in the
    parameters.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas())
    with counter:
        out = model.training_step(batch, 0)
        loss = out["loss"] if isinstance(out, dict) else out
        loss.backward()
    return float(counter.get_total_flops())
