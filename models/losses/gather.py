"""All-gather with autograd across data-parallel ranks, for losses that need the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_info() -> tuple[int, int]:
    """Return this process's rank and the world size, safe without a process group.

    Returns:
        ``(rank, world_size)``; ``(0, 1)`` when ``torch.distributed`` is unavailable or no
        default process group has been initialised.

    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _check_equal_batch(x: torch.Tensor, world_size: int) -> None:
    """Raise on every rank if the ranks' local batch sizes differ.

    One all-gather of a single int64 per rank on ``x.device`` (so it works with NCCL), then
    a host read of ``world_size`` integers. Every rank sees the same sizes, so every rank
    raises together and none is left waiting in a later collective.
    """
    local = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(sizes, local)
    per_rank = [int(s.item()) for s in sizes]
    if len(set(per_rank)) != 1:
        raise ValueError(
            f"gather_with_grad needs the same local batch size on every rank, got {per_rank} "
            "(rank order). Drop the last partial batch (drop_last / fixed-size batches)."
        )


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward reduce-scatters (sums) the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        chunks = list(grad.contiguous().chunk(dist.get_world_size(), dim=0))
        local = torch.empty_like(chunks[0])
        dist.reduce_scatter(local, chunks, op=dist.ReduceOp.SUM)
        return local


def gather_with_grad(x: torch.Tensor, *, check_sizes: bool = True) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping the autograd graph.

    The backward sums, over ranks, the gradients that all ranks computed for each rank's
    slice (a reduce-scatter). So if every rank ``k`` backpropagates its own local loss
    ``L_k``, the gradient arriving on this rank's ``x`` is ``d(sum_k L_k)/dx``, i.e. W times
    the gradient of the global loss ``mean_k L_k``; DDP's averaging of parameter gradients
    over ranks then yields exactly the gradient of ``mean_k L_k``. This rank's own slice of
    the output is itself differentiable, so callers use the output alone for all columns.

    Implemented as a small autograd function over the public, non-deprecated
    ``dist.all_gather`` / ``dist.reduce_scatter`` (list forms; NCCL and gloo both support
    them) on the default process group. ``torch.distributed.nn.functional.all_gather`` does
    the same but is deprecated as of torch 2.14 (FutureWarning), and its suggested
    replacement lives in the private ``torch.distributed._functional_collectives``.

    Without an initialised process group, or with world size 1, ``x`` is returned as is.

    Equal local batch sizes are required (an all-gather of unequal sizes is undefined and
    may hang on NCCL). With ``check_sizes=True`` this is verified by one extra all-gather of
    a single int64 per rank plus a host sync, and every rank raises together; pass ``False``
    when sizes are already known to match (e.g. the second of two gathers of tensors that
    share a batch dimension).

    Args:
        x: Tensor (B, ...), this rank's local batch. B must be equal on all ranks.
        check_sizes: Verify equal B across ranks and raise ``ValueError`` otherwise.

    Returns:
        Tensor (W*B, ...), rank ``r``'s rows at ``[r*B : (r+1)*B]``.

    Raises:
        ValueError: If ``check_sizes`` and the local batch sizes differ across ranks.

    """
    _, world_size = world_info()
    if world_size == 1:
        return x
    if check_sizes:
        _check_equal_batch(x, world_size)
    return _AllGatherWithGrad.apply(x)
