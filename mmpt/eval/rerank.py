"""Retrieval with re-ranking: similarity top-k, then a pair scorer (ITM head) re-orders them.

ALBEF/FIBER/UniVL evaluation: every query's k most similar candidates under the dual-encoder
similarity are scored by a (costlier) pair model and re-ordered by that score; candidates past
the k-th keep their similarity order. ``k = 0`` gives the plain similarity ranks, with the tie
rule of :func:`mmpt.eval.metrics.retrieval_ranks` (a tie goes to the lower index).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mmpt.eval.metrics import metrics_from_ranks

#: ``score(text_idx (P,), image_idx (P,)) -> (P,)``, higher = better match.
PairScorer = Callable[[Tensor, Tensor], Tensor]


def _positions(sim: Tensor, k: int, score: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """(Q, C) 0-based position of every candidate in each query's re-ranked list.

    ``score(query_idx (P,), cand_idx (P,))`` scores the pairs of the top ``k``.
    """
    order = torch.sort(-sim, dim=1, stable=True).indices  # ties: lower index first
    k = min(k, sim.shape[1])
    if k > 0:
        top = order[:, :k]
        queries = torch.arange(sim.shape[0]).repeat_interleave(k)
        scores = score(queries, top.reshape(-1)).view(-1, k).float().cpu()
        order[:, :k] = top.gather(1, torch.sort(-scores, dim=1, stable=True).indices)
    pos = torch.empty_like(order)
    ranks = torch.arange(order.shape[1]).expand_as(order)
    return pos.scatter_(1, order, ranks)


@torch.no_grad()
def reranked_ranks(
    sim: Tensor, text_to_image: Tensor, k: int, score: PairScorer, chunk: int = 1024
) -> tuple[Tensor, Tensor]:
    """1-based text->image and image->text ranks after re-ranking each query's top ``k``.

    Args:
        sim: (M, N) text-image similarities (M captions, N images), on the CPU.
        text_to_image: (M,) long, the image of each caption (every image has one at least).
        k: Candidates re-ranked per query; 0 for similarity ranks.
        score: Pair scorer (captions, images) -> (P,) scores.
        chunk: Queries per block (bounds the (chunk, candidates) order matrices).

    Returns:
        ``(t2i_ranks (M,), i2t_ranks (N,))``; an image's rank is its best caption's.

    """
    sim, owner = sim.float().cpu(), text_to_image.long().cpu()
    m, n = sim.shape
    t2i = torch.empty(m, dtype=torch.long)
    for q0 in range(0, m, chunk):
        q = torch.arange(q0, min(q0 + chunk, m))
        pos = _positions(sim[q], k, lambda t, i, q=q: score(q[t], i))
        t2i[q] = pos.gather(1, owner[q, None]).squeeze(1) + 1
    i2t = torch.empty(n, dtype=torch.long)
    own = owner[None, :] == torch.arange(n)[:, None]  # (N, M)
    for q0 in range(0, n, chunk):
        q = torch.arange(q0, min(q0 + chunk, n))
        pos = _positions(sim[:, q].T, k, lambda i, t, q=q: score(t, q[i]))
        i2t[q] = pos.masked_fill(~own[q], m).min(1).values + 1
    return t2i, i2t


def reranked_metrics(
    sim: Tensor,
    text_to_image: Tensor,
    k: int,
    score: PairScorer,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k and mean/median ranks before (``itc/``) and after (``itm/``) re-ranking.

    Args:
        sim: (M, N) text-image similarities.
        text_to_image: (M,) long, the image of each caption.
        k: Candidates re-ranked per query.
        score: Pair scorer, see :func:`reranked_ranks`.
        ks: Recall cut-offs.

    Returns:
        ``itc/t2i/R@1`` ..., ``itm/t2i/R@1`` ... (keys of
        :func:`~mmpt.eval.metrics.metrics_from_ranks` under both prefixes).

    """
    out = {}
    for name, kk in (("itc", 0), ("itm", k)):
        metrics = metrics_from_ranks(*reranked_ranks(sim, text_to_image, kk, score), ks=ks)
        out |= {f"{name}/{key}": value for key, value in metrics.items()}
    return out
