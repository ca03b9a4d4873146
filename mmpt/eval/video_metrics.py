"""Video-language evaluation: EgoMCQ accuracy, EPIC-KITCHENS-100 multi-instance retrieval."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mmpt.eval.metrics import retrieval_metrics
from mmpt.eval.modality import rename_retrieval

EGOMCQ_GROUPS = ("inter", "intra")


def _check_egomcq_inputs(
    scores: Tensor, answers: Tensor, types: Tensor, type_names: Mapping[int, str]
) -> None:
    """Raise ``ValueError`` for malformed EgoMCQ inputs or type mapping."""
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] < 2:
        raise ValueError(f"scores must be (Q, C) with Q >= 1, C >= 2, got {tuple(scores.shape)}")
    q, c = scores.shape
    for name, x in (("answers", answers), ("types", types)):
        if x.shape != (q,) or x.is_floating_point() or x.dtype == torch.bool:
            raise ValueError(
                f"{name} must be an integer tensor of shape ({q},), got {x.dtype} {tuple(x.shape)}"
            )
    if int(answers.min()) < 0 or int(answers.max()) >= c:
        raise ValueError(f"answers must lie in [0, {c})")
    names = list(type_names.values())
    if sorted(names) != sorted(set(names)) or not set(names) <= set(EGOMCQ_GROUPS):
        raise ValueError(
            f"type_names must map type ids to distinct names among {EGOMCQ_GROUPS}, "
            f"got {dict(type_names)}"
        )
    unknown = sorted(set(types.tolist()) - set(type_names))
    if unknown:
        raise ValueError(
            f"type ids {unknown} are not in type_names {dict(type_names)}: map every type id "
            "explicitly (EgoVLP's reference code swaps inter and intra)"
        )


@torch.no_grad()
def egomcq_accuracy(
    scores: Tensor, answers: Tensor, types: Tensor, type_names: Mapping[int, str]
) -> dict[str, float | int]:
    """EgoMCQ (Ego4D multiple-choice) accuracy, overall and per question type.

    Each text query has C candidate clips (5 in EgoMCQ); the prediction is the candidate
    with the highest score. Inter-video questions draw the candidates from different
    videos, intra-video ones from adjacent clips of one video. The dataset stores the type
    as an integer id, and EgoVLP's reference metric assigns the names by the sorted order
    of the ids, which swaps the two; so the id -> name mapping is an explicit argument,
    e.g. ``{1: "inter", 2: "intra"}``, checked against your annotation file.

    Tie rule: a query counts as correct only if its answer scores strictly higher than
    every other candidate, so tied (or NaN) scores never count as a hit; constant scores
    give accuracy 0, not the share of answers at index 0 that ``argmax`` would give.

    Args:
        scores: Float tensor (Q, C), the score of every candidate for every query.
        answers: Integer tensor (Q,), the correct candidate index in [0, C).
        types: Integer tensor (Q,), each query's type id.
        type_names: Maps every type id present in ``types`` to ``"inter"`` or ``"intra"``
            (distinct names; an id may be absent from ``types``).

    Returns:
        ``overall_acc``, ``inter_video_acc``, ``intra_video_acc`` in [0, 1] (EgoVLP
        reports percentages; a type without queries gives NaN), and the integer counts
        ``count``, ``inter_video_count``, ``intra_video_count``.

    Raises:
        ValueError: On malformed shapes or answers, invalid ``type_names``, or a type id in
            ``types`` that ``type_names`` does not map.

    """
    _check_egomcq_inputs(scores, answers, types, type_names)
    answers = answers.to(scores.device, torch.long)
    own = scores.gather(1, answers[:, None])  # (Q, 1)
    others = torch.ones_like(scores, dtype=torch.bool).scatter_(1, answers[:, None], False)
    correct = ((own > scores) | ~others).all(1).cpu()  # (Q,)
    types = types.cpu()
    out: dict[str, float | int] = {"overall_acc": float(correct.double().mean())}
    counts: dict[str, int] = {"count": int(correct.numel())}
    for group in EGOMCQ_GROUPS:
        ids = [k for k, v in type_names.items() if v == group]
        member = torch.isin(types, torch.tensor(ids, dtype=types.dtype))
        n = int(member.sum())
        out[f"{group}_video_acc"] = float(correct[member].double().mean()) if n else math.nan
        counts[f"{group}_video_count"] = n
    return out | counts


def _check_mir_inputs(sim: Tensor, relevance: Tensor) -> None:
    """Raise ``ValueError`` for malformed similarity or relevance matrices."""
    if sim.ndim != 2 or sim.shape != relevance.shape or sim.numel() == 0:
        raise ValueError(
            "sim and relevance must be non-empty matrices of the same shape (Nv, Nt), got "
            f"{tuple(sim.shape)} and {tuple(relevance.shape)}"
        )
    if torch.isnan(sim).any():
        raise ValueError("sim contains NaN: the ranking is undefined")
    if not torch.isfinite(relevance).all() or (relevance < 0).any():
        raise ValueError("relevance must be finite and non-negative")


def _pessimistic_order(scores: Tensor, relevance: Tensor) -> Tensor:
    """Column order per row: by score, descending; among equal scores, least relevant first.

    Args:
        scores: Float tensor (Q, C).
        relevance: Float tensor (Q, C).

    Returns:
        Long tensor (Q, C): ``relevance.gather(1, order)`` is each row's ranked relevance.

    """
    by_rel = relevance.argsort(dim=1, stable=True)  # ascending relevance
    by_score = scores.gather(1, by_rel).argsort(dim=1, descending=True, stable=True)
    return by_rel.gather(1, by_score)


def _row_chunks(q: int, chunk_size: int) -> list[slice]:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return [slice(s, min(s + chunk_size, q)) for s in range(0, q, chunk_size)]


@torch.no_grad()
def average_precision(
    scores: Tensor, relevance: Tensor, threshold: float = 1.0, chunk_size: int = 1024
) -> Tensor:
    """Average precision of every row (query) ranking its columns (candidates).

    ``AP = sum_k P@k * rel(k) / num_relevant`` over the ranking, where a candidate is
    relevant if ``relevance >= threshold`` and ``P@k`` is the fraction of relevant ones in
    the top k (EPIC-KITCHENS-100 ``mAP.py``; its relevant set is ``relevance == 1``, which
    the default ``threshold=1.0`` reproduces for relevance in [0, 1]). Tie rule: see
    :func:`multi_instance_retrieval`.

    Args:
        scores: Float tensor (Q, C).
        relevance: Float tensor (Q, C), non-negative.
        threshold: Relevance at or above which a candidate counts as relevant (> 0).
        chunk_size: Queries ranked at a time (memory is O(chunk_size * C)).

    Returns:
        Float64 tensor (Q,) on the CPU; NaN for a query with no relevant candidate.

    """
    _check_mir_inputs(scores, relevance)
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    out = []
    for rows in _row_chunks(scores.shape[0], chunk_size):
        s, r = scores[rows].double(), relevance[rows].to(scores.device, torch.float64)
        hit = (r.gather(1, _pessimistic_order(s, r)) >= threshold).double()  # (q, C)
        k = torch.arange(1, hit.shape[1] + 1, dtype=torch.float64, device=hit.device)
        precision = hit.cumsum(1) / k
        out.append(((precision * hit).sum(1) / hit.sum(1)).cpu())  # 0/0 -> NaN
    return torch.cat(out)


@torch.no_grad()
def ndcg(
    scores: Tensor, relevance: Tensor, at_num_relevant: bool = True, chunk_size: int = 1024
) -> Tensor:
    """Normalised discounted cumulative gain of every row (query) ranking its columns.

    ``DCG = sum_i rel_i / log2(i + 1)`` over ranks i = 1, 2, ... of the ranking, with graded
    ``rel``; ``IDCG`` is the DCG of the ideal ordering (descending relevance) and
    ``nDCG = DCG / IDCG``. With ``at_num_relevant`` (EPIC-KITCHENS-100 ``nDCG.py``) the sum
    stops after the first k ranks, k = the query's number of candidates with relevance
    > 0, so relevant items ranked behind irrelevant ones earn nothing past rank k (IDCG is
    unaffected: the ideal ordering puts all k first). Tie rule: see
    :func:`multi_instance_retrieval`.

    Args:
        scores: Float tensor (Q, C).
        relevance: Float tensor (Q, C), non-negative graded relevance.
        at_num_relevant: Cut the DCG at k = number of candidates with relevance > 0.
        chunk_size: Queries ranked at a time (memory is O(chunk_size * C)).

    Returns:
        Float64 tensor (Q,) on the CPU; NaN for a query whose relevance is all zero.

    """
    _check_mir_inputs(scores, relevance)
    out = []
    for rows in _row_chunks(scores.shape[0], chunk_size):
        s, r = scores[rows].double(), relevance[rows].to(scores.device, torch.float64)
        ranked = r.gather(1, _pessimistic_order(s, r))  # (q, C)
        ideal = r.sort(dim=1, descending=True).values
        pos = torch.arange(r.shape[1], device=r.device)
        discount = 1.0 / torch.log2(pos.double() + 2.0)  # rank i = pos + 1: 1 / log2(i + 1)
        if at_num_relevant:
            discount = discount * (pos[None, :] < (r > 0).sum(1, keepdim=True))
        out.append(((ranked * discount).sum(1) / (ideal * discount).sum(1)).cpu())
    return torch.cat(out)


def _nanmean(x: Tensor) -> float:
    """Mean over the non-NaN entries; NaN if there are none."""
    return float(x.nanmean()) if (~x.isnan()).any() else math.nan


@torch.no_grad()
def multi_instance_retrieval(
    sim: Tensor,
    relevance: Tensor,
    map_threshold: float = 1.0,
    ndcg_at_num_relevant: bool = True,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """EPIC-KITCHENS-100 multi-instance retrieval: mAP and nDCG, both directions.

    Video->text ranks the columns of every row of ``sim``; text->video ranks the rows of
    every column. mAP is the mean over queries of :func:`average_precision` with binary
    relevance ``relevance >= map_threshold``; the default 1.0 is EPIC's rule (a caption is
    relevant iff its semantic relevance is exactly 1, i.e. the same verb and noun classes),
    NOT ``relevance > 0``; pass a threshold at or below your smallest positive relevance
    to count every positive. nDCG is the mean of :func:`ndcg` with the graded relevance,
    cut at each query's number of non-zero relevances as EPIC does. Each ``avg`` is the
    mean of the two directions. Results are fractions in [0, 1] (EPIC reports x 100).

    Queries with nothing to find (no candidate at the mAP threshold, or all-zero
    relevance for nDCG) have an undefined score (EPIC's code returns NaN for the whole
    metric); they are left out of the mean here. On EPIC's test set every query has a
    relevant candidate, so the two agree there.

    Tie rule (deterministic, never in the query's favour): candidates with equal scores
    are ranked least relevant first. A constant ``sim`` thus scores as the worst ordering,
    and the result does not depend on the order of rows or columns. (EPIC's code leaves
    ties to ``argsort``, whose order among equal values is unspecified.)

    Args:
        sim: Float tensor (Nv, Nt), video-text similarity (any monotone score).
        relevance: Float tensor (Nv, Nt), non-negative graded relevance (EPIC: in [0, 1]).
        map_threshold: Relevance at or above which a candidate counts for mAP (> 0).
        ndcg_at_num_relevant: EPIC's cut of the DCG at the number of relevant candidates.
        chunk_size: Queries ranked at a time.

    Returns:
        ``v2t/mAP``, ``t2v/mAP``, ``avg/mAP``, ``v2t/nDCG``, ``t2v/nDCG``, ``avg/nDCG``.

    Raises:
        ValueError: On shape mismatches, NaN scores, or negative or non-finite relevance.

    """
    out: dict[str, float] = {}
    for name, s, r in (("v2t", sim, relevance), ("t2v", sim.T, relevance.T)):
        out[f"{name}/mAP"] = _nanmean(average_precision(s, r, map_threshold, chunk_size))
    for name, s, r in (("v2t", sim, relevance), ("t2v", sim.T, relevance.T)):
        out[f"{name}/nDCG"] = _nanmean(ndcg(s, r, ndcg_at_num_relevant, chunk_size))
    for metric in ("mAP", "nDCG"):
        out[f"avg/{metric}"] = (out[f"v2t/{metric}"] + out[f"t2v/{metric}"]) / 2
    return out


def video_text_retrieval_metrics(
    video_emb: Tensor,
    text_emb: Tensor,
    text_to_video: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 4096,
) -> dict[str, float]:
    """Video-text recall@k and mean/median rank: :func:`mmpt.eval.metrics.retrieval_metrics`.

    The computation (and its tie rule) is the image-text one with a video embedding per
    clip; only the keys are renamed, ``t2i`` -> ``t2v`` and ``i2t`` -> ``v2t``.

    Args:
        video_emb: Float tensor (N, D), one embedding per clip.
        text_emb: Float tensor (M, D).
        text_to_video: Long tensor (M,), the clip index of each caption.
        ks: Recall cut-offs.
        chunk_size: Similarity tile size.

    Returns:
        ``t2v/R@{k}``, ``v2t/R@{k}``, ``t2v/mean_rank``, ``t2v/median_rank``,
        ``v2t/mean_rank``, ``v2t/median_rank``.

    """
    out = retrieval_metrics(video_emb, text_emb, text_to_video, ks=ks, chunk_size=chunk_size)
    return rename_retrieval(out, "video")
