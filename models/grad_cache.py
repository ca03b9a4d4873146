"""Gradient caching for contrastive losses: a large batch embedded in small chunks, same gradients.

Gradient caching (Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup", 2021) splits the encoders' work, not the loss. :func:`cached_embeddings`:

1. embeds the whole local batch chunk by chunk without autograd graphs (only the (B, D)
   embeddings stay in memory), recording the random generator states before every chunk;
2. hands back (B, D) embeddings that the caller feeds to the loss on the full batch, gathered
   across ranks as usual, so the loss sees every negative;
3. when the loss is backpropagated, receives d loss / d embeddings and re-runs each chunk with
   autograd, under the forward's autocast settings and with the chunk's random states put
   back (dropout and drop-path draw the same masks), backpropagating the chunk's cached
   gradient. Peak activation memory is that of one chunk.

Why inside ``loss.backward()`` (a custom autograd function) and not manual optimization:
Lightning's automatic optimization keeps working unchanged (gradient clipping,
``accumulate_grad_batches``, the AMP grad scaler, which scales the loss and hence the cached
gradients, LR schedules and logging), and the replay is invisible to the training loop.

Parameter gradients reach the parameters once per step, whatever the number of chunks:

- one process and DDP: each chunk's parameter gradients are taken with
  ``torch.autograd.grad`` and summed; the autograd function returns the sum as the gradient of
  its parameter inputs, so each parameter is accumulated (and DDP's all-reduce hook fires)
  once, after the last chunk. Non-reentrant activation checkpointing (mmpt's
  ``ActivationCheckpointing``, timm's and open_clip's ``set_grad_checkpointing``) works inside.
- FSDP2 (``fully_shard``): gradients flow to the sharded parameters through FSDP's own hooks,
  so each chunk is backpropagated with ``torch.autograd.backward`` and gradient
  reduce-scatter is switched off (``set_requires_gradient_sync(False)``) for all chunks but
  the last, which reduces the accumulated sum once.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from mmpt.models.rng_state import capture, restore

#: Embeds rows ``[start, stop)`` of the batch: returns one tensor (rows, D) per embedding kind.
EmbedFn = Callable[[slice], tuple[torch.Tensor, ...]]


@dataclasses.dataclass
class GradCache:
    """``model.grad_cache``: embed the batch in chunks of ``chunk_size`` rows.

    Args:
        chunk_size: Rows (pairs) per encoder pass; activation memory follows it, not the batch.
    """

    chunk_size: int

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(
                f"model.grad_cache.chunk_size must be a positive integer, got {self.chunk_size!r}"
            )


def _autocast_states(device_type: str) -> list[tuple[str, bool, torch.dtype]]:
    """The autocast settings in force for ``device_type`` and for the CPU (to re-enter later)."""
    kinds = dict.fromkeys([device_type, "cpu"])
    return [(k, torch.is_autocast_enabled(k), torch.get_autocast_dtype(k)) for k in kinds]


def _fsdp_root(root: nn.Module | None) -> Any | None:
    """``root`` when FSDP2 (``fully_shard``) shards it, else None."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return root if isinstance(root, FSDPModule) else None


class _Plan:
    """State shared by the two passes of one cached batch (one per training step)."""

    def __init__(
        self,
        embed: EmbedFn,
        size: int,
        chunk_size: int,
        params: list[nn.Parameter],
        fsdp: Any | None,
        replay_rng: bool,
    ) -> None:
        self.embed, self.params, self.fsdp, self.replay_rng = embed, params, fsdp, replay_rng
        self.chunks = [slice(i, min(i + chunk_size, size)) for i in range(0, size, chunk_size)]
        self.states: list[dict[str, Any]] = []
        self.autocast: list[tuple[str, bool, torch.dtype]] = []

    def first_pass(self) -> tuple[torch.Tensor, ...]:
        """Embed every chunk without graphs; record each chunk's random states (forward)."""
        parts = []
        for rows in self.chunks:
            self.states.append(capture() if self.replay_rng else {})
            parts.append(self.embed(rows))
        self.autocast = _autocast_states(parts[0][0].device.type)
        return tuple(torch.cat(kind) for kind in zip(*parts, strict=True))

    def replay(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """Re-run each chunk with autograd and backpropagate its slice of ``grads``.

        Returns:
            The summed parameter gradients (one process, DDP) or Nones (FSDP2, whose hooks
            have set the sharded gradients already).
        """
        total: list[torch.Tensor | None] = [None] * len(self.params)
        outside = capture()  # draws made between forward and backward stay as they were
        try:
            for i, rows in enumerate(self.chunks):
                if self.replay_rng:
                    restore(self.states[i])
                with torch.enable_grad(), contextlib.ExitStack() as stack:
                    for kind, enabled, dtype in self.autocast:
                        stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
                    embs = self.embed(rows)
                outs, cached = [], []
                for emb, grad in zip(embs, grads, strict=True):
                    if emb.requires_grad:
                        outs.append(emb)
                        cached.append(grad[rows].to(emb.dtype))
                if not outs:
                    continue
                if self.fsdp is not None:
                    self.fsdp.set_requires_gradient_sync(i == len(self.chunks) - 1)
                    torch.autograd.backward(outs, cached)
                    continue
                got = torch.autograd.grad(outs, self.params, cached, allow_unused=True)
                for j, g in enumerate(got):
                    if g is not None:
                        total[j] = g if total[j] is None else total[j].add_(g)
        finally:
            if self.fsdp is not None:
                self.fsdp.set_requires_gradient_sync(True)
            restore(outside)
        return total


class _CachedEmbeddings(torch.autograd.Function):
    """Forward: :meth:`_Plan.first_pass`. Backward: :meth:`_Plan.replay`."""

    @staticmethod
    def forward(ctx, plan: _Plan, anchor: torch.Tensor, *params: torch.Tensor):  # noqa: D102
        ctx.plan = plan
        return plan.first_pass()

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # noqa: D102
        plan, ctx.plan = ctx.plan, None
        if plan is None:
            raise RuntimeError("gradient caching replays a batch once: no retain_graph reuse")
        return None, None, *plan.replay(grads)


def cached_embeddings(
    embed: EmbedFn,
    size: int,
    chunk_size: int,
    modules: Sequence[nn.Module],
    root: nn.Module | None = None,
    replay_rng: bool = True,
) -> tuple[torch.Tensor, ...]:
    """Embed ``size`` rows in chunks without graphs; backward re-runs each chunk (grad cache).

    Under ``torch.no_grad()`` (validation) this is simply the chunked embedding.

    Args:
        embed: Embeds the batch rows of a slice: ``embed(slice(a, b))`` returns tensors
            (b - a, D_k), e.g. (image embeddings, text embeddings). Called twice per chunk
            (no graph, then with graph), so it must be a pure function of the rows and of the
            random generator state.
        size: Number of rows of the batch, B.
        chunk_size: Rows per encoder pass.
        modules: The encoders ``embed`` runs; their trainable parameters get the gradients.
        root: The module that FSDP2 may have sharded (the LightningModule); None: not sharded.
        replay_rng: Put each chunk's random generator states back for the second pass (only a
            test turns this off, to show that dropout masks then differ).

    Returns:
        Tensors (B, D_k), one per output of ``embed``, the chunks concatenated in order. Their
        backward (run once) re-runs every chunk and leaves the parameter gradients of the
        full-batch computation.
    """
    if size < 1:
        raise ValueError("gradient caching needs a non-empty batch")
    if not torch.is_grad_enabled():
        parts = [embed(slice(i, min(i + chunk_size, size))) for i in range(0, size, chunk_size)]
        return tuple(torch.cat(kind) for kind in zip(*parts, strict=True))
    fsdp = _fsdp_root(root)
    params = [] if fsdp is not None else _trainable(modules)
    plan = _Plan(embed, size, chunk_size, params, fsdp, replay_rng)
    anchor = torch.empty(0, requires_grad=True)  # makes the outputs differentiable under FSDP2
    return _CachedEmbeddings.apply(plan, anchor, *params)


def fsdp_forward_method(module: nn.Module, name: str) -> Callable[..., Any]:
    """``module.<name>``, run between FSDP2's pre- and post-forward hooks when FSDP2 shards it.

    FSDP2 gathers the parameters of the root unit (those outside the sharded layers) only
    around ``forward``; a method that embeds chunks outside ``forward`` must be registered
    (``register_fsdp_forward_method``, once per module). Without FSDP2: the plain method.
    """
    if _fsdp_root(module) is not None and name not in vars(module):
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(module, name)
    return getattr(module, name)


def _trainable(modules: Sequence[nn.Module]) -> list[nn.Parameter]:
    """Trainable parameters of ``modules``, each once, in module order."""
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    return list(seen.values())
