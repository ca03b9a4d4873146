"""``mmpt eval univl``: UniVL captioning (CIDEr, BLEU-4, ROUGE-L, METEOR) and re-ranked retrieval.

Video->text: the decoder's captions of every clip (greedy or beam search, :class:`Decoding`)
scored against all its reference captions by :func:`~mmpt.eval.caption_metrics.caption_scores`;
``--shuffled-baseline`` also scores the same decoder fed another clip's video (a control: the
gap is what the decoder reads from the video). Text->video: R@1/5/10 and median rank of the
joint embeddings, then with the top ``--rerank-k`` clips of each caption re-ordered by the
alignment head (``rerank/...``). JSON report in ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from mmpt.batch import VideoFeatureBatch

RETRIEVAL_KS = (1, 5, 10)


def add_univl_args(s: argparse.ArgumentParser) -> None:
    """The task's own flags (the common ones come from ``mmpt eval``)."""
    s.add_argument("--rerank-k", type=int, default=10, help="clips re-ranked per caption (10)")
    s.add_argument("--max-new-tokens", type=int, default=20, help="longest caption (20)")
    s.add_argument("--num-beams", type=int, default=1, help="beam width; 1: greedy (1)")
    s.add_argument(
        "--shuffled-baseline",
        action="store_true",
        help="also caption every clip from another clip's video (a derangement)",
    )
    s.add_argument("--seed", type=int, default=0, help="seed of the shuffled baseline (0)")
    s.add_argument(
        "--no-meteor", action="store_true", help="skip METEOR (its Java scorer takes ~15 s)"
    )


@torch.no_grad()
def rerank_ranks(
    sim: torch.Tensor, text_to_video: torch.Tensor, top: torch.Tensor, scores: torch.Tensor
) -> torch.Tensor:
    """1-based text->video ranks after re-ranking each caption's top k clips.

    Without re-ranking, a clip outranks the caption's own clip if its similarity is higher,
    or equal with a lower index (:func:`~mmpt.eval.metrics.retrieval_ranks`' tie rule). An own
    clip inside the top k is re-ranked among the k by ``scores`` (ties: the earlier of the
    top k first); one outside keeps its rank (the top k all stay above it).

    Args:
        sim: (M, N) caption-clip similarities.
        text_to_video: Long (M,), each caption's own clip.
        top: Long (M, k), each caption's top k clips in similarity order.
        scores: (M, k) re-ranking scores of those clips.

    Returns:
        Long (M,) ranks.
    """
    own = text_to_video.long()
    rows = torch.arange(sim.shape[0])
    own_sim = sim[rows, own][:, None]
    cols = torch.arange(sim.shape[1])[None]
    above = (sim > own_sim) | ((sim == own_sim) & (cols < own[:, None]))
    ranks = above.sum(1) + 1
    hit = top == own[:, None]  # (M, k)
    inside = hit.any(1)
    pos = hit.float().argmax(1)
    own_score = scores[rows, pos][:, None]
    k_idx = torch.arange(top.shape[1])[None]
    better = (scores > own_score) | ((scores == own_score) & (k_idx < pos[:, None]))
    return torch.where(inside, better.sum(1) + 1, ranks)


def _references(batch: Any, tokenizer_path: str) -> list[list[str]]:
    """Every clip's reference captions (decoded from tokens for raw-clip batches)."""
    owner = batch.text_to_video.tolist()
    texts = list(batch.captions) if isinstance(batch, VideoFeatureBatch) else None
    if texts is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        texts = tok.batch_decode(batch.text_tokens.tolist(), skip_special_tokens=True)
    refs: list[list[str]] = [[] for _ in range(len(batch))]
    for text, i in zip(texts, owner, strict=True):
        refs[i].append(text)
    return refs


def _pad_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate (n_i, T_i, ...) tensors along dim 0, zero-padding dim 1 to the longest."""
    t = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, 0) * (p.ndim - 2) + (0, t - p.shape[1]))
                      for p in parts])  # fmt: skip


def run_univl(args: argparse.Namespace, model: Any, dm: Any, device: torch.device,
              out: Path) -> int:  # fmt: skip
    """Evaluate a UniVL checkpoint; writes ``univl.json`` and prints the metrics."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from mmpt.datamodules.loader import make_loader
    from mmpt.eval.caption_metrics import caption_scores
    from mmpt.eval.metrics import recall_at_k
    from mmpt.eval.report import print_metrics, write_json
    from mmpt.eval.video_metrics import video_text_retrieval_metrics
    from mmpt.generate import Decoding
    from mmpt.run_config import eval_stream_config

    if args.rerank_k < 1:
        raise ValueError(f"--rerank-k must be >= 1, got {args.rerank_k}")
    meteor = False if args.no_meteor else None  # None: when Java is there
    decoding = Decoding(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    cfg, field, data = eval_stream_config(dm, args.data)
    dm.val_batch_size = args.batch_size
    stream = dm.stream(cfg, train=False, field=field)
    stream.where = f"{field} ({data})"
    model.to(device).eval()
    keys, refs, preds, feats, masks, states, v_emb, t_emb, tokens, owner = ([] for _ in range(10))
    for batch in make_loader(stream, args.num_workers):
        batch = dm.normalize(move_data_to_device(batch, device))
        f, m = model.video_inputs(batch)
        s = model.video(f, m)
        offset = sum(len(k) for k in keys)
        keys.append(list(batch.keys))
        refs += _references(batch, model.text.tokenizer.path)
        preds += model.generate_captions(f, m, decoding)
        feats.append(f.cpu()), masks.append(m.cpu()), states.append(s.cpu())
        v_emb.append(model.video_embedding(s, m).cpu())
        t_emb.append(model.encode_text(batch.text_tokens).cpu())
        tokens.append(batch.text_tokens.cpu())
        owner.append(batch.text_to_video.cpu() + offset)
    if not keys:
        raise ValueError(f"{stream.where}: no evaluation clip could be read")
    ids = [str(i) for i in range(len(preds))]
    references = dict(zip(ids, refs, strict=True))
    metrics: dict[str, Any] = {
        f"caption/{k}": v for k, v in caption_scores(dict(zip(ids, preds, strict=True)),
                                                     references, meteor=meteor).items()
    }  # fmt: skip
    feats, masks, states = _pad_cat(feats), _pad_cat(masks), _pad_cat(states)
    if args.shuffled_baseline:
        g = torch.Generator().manual_seed(args.seed)
        perm = torch.randperm(len(ids), generator=g)
        perm = perm[torch.roll(torch.arange(len(ids)), 1)][torch.argsort(perm)]  # no fixed point
        shuffled = []
        for i in range(0, len(ids), args.batch_size):
            rows = perm[i : i + args.batch_size]
            shuffled += model.generate_captions(feats[rows].to(device), masks[rows].to(device),
                                                decoding)  # fmt: skip
        scores = caption_scores(dict(zip(ids, shuffled, strict=True)), references, meteor=meteor)
        metrics |= {f"shuffled/{k}": v for k, v in scores.items()}
    v_emb, t_emb, tokens, owner = map(torch.cat, (v_emb, t_emb, tokens, owner))
    metrics |= video_text_retrieval_metrics(v_emb, t_emb, owner, ks=RETRIEVAL_KS)
    k = min(args.rerank_k, len(ids))
    sim = t_emb @ v_emb.T
    top = sim.topk(k, dim=1).indices  # (M, k)
    align = torch.empty(top.shape)
    with torch.no_grad():
        for i in range(0, len(tokens), max(1, args.batch_size // k)):
            tk = tokens[i : i + max(1, args.batch_size // k)].to(device)
            hidden, tmask = model.text.hidden_states(tk)
            cand = top[i : i + len(tk)].reshape(-1)
            rep = torch.arange(len(tk), device=device).repeat_interleave(k)
            score = model.alignment_scores((hidden[rep], tmask[rep]), states[cand].to(device),
                                           masks[cand].to(device))  # fmt: skip
            align[i : i + len(tk)] = score.view(-1, k).float().cpu()
    ranks = rerank_ranks(sim, owner, top, align)
    for r in RETRIEVAL_KS:
        metrics[f"rerank/t2v/R@{r}"] = recall_at_k(ranks, r)
    metrics["rerank/t2v/median_rank"] = float(ranks.double().quantile(0.5))  # mean of 2 middles
    examples = [{"references": refs[i], "generated": preds[i]} for i in range(min(10, len(ids)))]
    path = write_json(
        out / "univl.json", metrics, checkpoint=str(args.ckpt), data=data, rerank_k=k,
        num_clips=len(ids), num_captions=len(tokens), max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams, examples=examples,
    )  # fmt: skip
    print_metrics(metrics, title=f"mmpt eval univl: {data}")
    print(f"json: {path}")
    return 0
