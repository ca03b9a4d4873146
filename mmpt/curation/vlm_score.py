"""``mmpt data score --kind vlm``: MLM-Filter-style VLM scores as a Lightning predict job.

The job engine is the CLIP score's (:mod:`mmpt.curation.score`): ``Trainer.predict`` over the
shards, split by node, rank and worker, one parquet file per shard, resumable. Here the
loader's workers decode each sample's image and caption and render its prompt rows as the
model trained on them (:func:`~mmpt.eval.vlm_likelihood.render_row`); the rows of a batch go
through the VLM's own forward in one right-padded packed batch, and
:class:`VLMScorer` turns the logits into one column per metric (see
:mod:`mmpt.curation.vlm_prompt` for the two modes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch

from mmpt.curation.score import ScoreWriter, ShardKeyed, plan, run_predict
from mmpt.curation.vlm_prompt import ScorePrompt

if TYPE_CHECKING:
    from mmpt.batch import VLMBatch
    from mmpt.datamodules.templates import Template
    from mmpt.models.vlm import VLMModule
    from mmpt.preprocess import VLMPreprocess


@dataclass
class ScoreBatch:
    """The prompt rows of B samples (``rows_per_sample`` consecutive rows each).

    Attributes:
        rows: (R, L) left-padded rows, R = B * rows_per_sample; pixels uint8 until the step.
        targets: (R, L) long: the caption's token ids where it is scored, else -100.
        keep: Last positions whose logits the scores need (1: the next token; a caption:
            its longest span + 1).
        keys: ``<shard>/<__key__>`` of each sample.
        skipped: Samples dropped as unreadable since the previous batch.
    """

    rows: VLMBatch
    targets: torch.Tensor
    keep: int
    keys: list[str] = field(default_factory=list)
    skipped: int = 0


class ScoreRows:
    """Worker side: a raw sample -> (its prompt rows, their crops, its key).

    Args:
        pre: The model's preprocessing (tokenizer, resolution policy, token counts).
        template: Chat template the rows are rendered with.
        system: System prompt (None: none).
        prompt: The checked prompt YAML.
        image_key: Image member (default: the first of jpg, jpeg, png, webp).
        text_key: Caption field (``txt``, ``json:caption`` ...; ``;`` separates choices).
    """

    def __init__(
        self,
        pre: VLMPreprocess,
        template: Template,
        system: str | None,
        prompt: ScorePrompt,
        image_key: str | None = None,
        text_key: str = "txt;json:caption",
    ) -> None:
        self.pre, self.template, self.system, self.prompt = pre, template, system, prompt
        self.image_key, self.text_key = image_key, text_key

    def rows(self, image: Any, caption: str) -> tuple[list[dict], list]:
        """The rows of one (PIL image, caption) pair and the crops they hold, in row order."""
        from mmpt.datamodules.templates import IMAGE_PLACEHOLDER
        from mmpt.eval.vlm_likelihood import render_row

        crop = self.pre.policy(image.convert("RGB"))
        p = self.prompt

        def row(text: str, crops: list, reply: str | None = None) -> dict:
            return render_row(self.pre, self.template, self.system, text, crops, reply)

        if p.mode == "judgement":
            out = [row(t.replace("{caption}", caption), [crop]) for t in p.prompts.values()]
            return out, [crop] * len(out)
        out = [row(p.prompt, [crop], caption)]
        if p.pmi:
            out.append(row(p.prompt.replace(IMAGE_PLACEHOLDER, "").strip(), [], caption))
        return out, [crop]

    def __call__(self, sample: dict[str, Any]) -> tuple[list[dict], list, str]:
        """Raises (the stream skips and counts the sample): no image, no caption, bad bytes."""
        from mmpt.curation.dedup import IMAGE_KEYS
        from mmpt.datamodules.decode import decode_image, read_captions

        names = [self.image_key] if self.image_key else [k for k in IMAGE_KEYS if k in sample]
        if not names or names[0] not in sample:
            raise ValueError(f"no image member ({self.image_key or '/'.join(IMAGE_KEYS)})")
        caption = read_captions(sample, self.text_key)[0]
        return (*self.rows(decode_image(sample[names[0]]), caption), sample["__key__"])


class ScoreCollate:
    """(rows, crops, key) items -> one :class:`ScoreBatch` (the caption targets split off)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[tuple[list[dict], list, str]]) -> ScoreBatch:
        """Every item's rows, left-padded into one packed batch."""
        from mmpt.eval.vlm_likelihood import padded_batch

        rows = [r for rs, _, _ in items for r in rs]
        crops = [c for _, cs, _ in items for c in cs]
        batch = padded_batch(rows, crops, self.pad_id, left=True)  # every row ends at L - 1
        targets, batch.labels = batch.labels, None  # no loss in the forward: logits only
        scored = [r["labels"] != -100 for r in rows]  # the caption span (none: a judgement)
        spans = [len(m) - int(m.long().argmax()) for m in scored if m.any()]
        keep = 1 + max(spans, default=0)  # the logit before each target, and the last one
        return ScoreBatch(batch, targets, keep, [key for _, _, key in items])


class VLMScorer(L.LightningModule):
    """Wraps a VLM: ``predict_step`` gives each sample's score columns.

    Args:
        model: The VLM (``mmpt.load`` or a checkpoint), in eval mode.
        prompt: The checked prompt YAML.
        name: Column prefix (``mlm`` -> ``mlm_itm`` ...).

    Raises:
        ValueError: judgement scores that are not one token each.
    """

    def __init__(self, model: VLMModule, prompt: ScorePrompt, name: str) -> None:
        super().__init__()
        if model.vision is None:
            raise ValueError(f"{type(model).__name__} has no vision tower: it cannot score images")
        self.model, self.prompt = model.eval(), prompt
        self.columns = prompt.columns(name)
        pre = model.preprocess
        self.mean, self.std = pre.image.mean, pre.image.std
        ids = prompt.score_token_ids(pre.tokenizer) if prompt.mode == "judgement" else []
        self.register_buffer("score_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        values = torch.tensor(prompt.values(), dtype=torch.float64)
        self.register_buffer("values", values, persistent=False)

    @torch.no_grad()
    def predict_step(self, batch: ScoreBatch, batch_idx: int) -> dict[str, Any]:
        """{``keys``: B keys, column: (B,) float64 tensor for each score column}."""
        from mmpt.datamodules.transforms import normalize_images

        rows = batch.rows
        dtype = next(self.model.vision.parameters()).dtype
        rows.pixels = [normalize_images(p, self.mean, self.std).to(dtype) for p in rows.pixels]
        logits = self.model(rows, logits_to_keep=batch.keep).logits  # (R, keep, V)
        n = len(batch.keys)
        if self.prompt.mode == "judgement":
            probs = logits[:, -1, self.score_ids].double().softmax(-1)  # over the score tokens
            scores = (probs @ self.values).view(n, -1)
        else:
            scores = mean_target_logprob(logits, batch.targets[:, -batch.keep :]).view(n, -1)
            if self.prompt.pmi:
                scores = torch.cat([scores[:, :1], scores[:, :1] - scores[:, 1:]], dim=1)
        return {"keys": batch.keys, **dict(zip(self.columns, scores.unbind(1), strict=True))}


def mean_target_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(R,) float64 mean log-probability of each row's target tokens (-100: not a target).

    Args:
        logits: (R, L, V) next-token logits.
        targets: (R, L) long token ids, -100 off the scored span.
    """
    logp = logits[:, :-1].double().log_softmax(-1)
    target = targets[:, 1:]
    picked = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    mask = target != -100
    return (picked * mask).sum(-1) / mask.sum(-1).clamp(min=1)


class ScoreData(L.LightningDataModule):
    """The shards to score as one plain (unshuffled) stream, split by rank and worker.

    Args:
        urls: Shard URLs.
        sample_fn: Raw sample -> item (raising skips and counts it).
        collate_fn: Items -> batch with ``skipped``.
        batch_size: Samples per batch and rank.
        num_workers: Loader workers per rank.
    """

    def __init__(
        self, urls: list[str], sample_fn: Any, collate_fn: Any, batch_size: int, num_workers: int
    ) -> None:
        super().__init__()
        self.urls, self.sample_fn, self.collate_fn = urls, sample_fn, collate_fn
        self.batch_size, self.num_workers = batch_size, num_workers

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        """The rank's loader; keys carry their shard file name from the worker on."""
        from mmpt.datamodules.loader import make_loader
        from mmpt.datamodules.streams import ShardStream, StreamConfig

        cfg = StreamConfig(urls="::".join(self.urls), shuffle_buffer=0, shuffle_shards=False)
        trainer = self.trainer
        stream = ShardStream(
            cfg.sources("--from"),
            cfg,
            ShardKeyed(self.sample_fn),
            self.collate_fn,
            batch_size=self.batch_size,
            partial=True,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
            num_workers=self.num_workers,
        )
        stream.where = "--from"
        return make_loader(stream, self.num_workers)


def score_vlm(
    model: VLMModule,
    prompt: ScorePrompt,
    source: str,
    out: str | Path,
    name: str = "mlm",
    accelerator: str = "auto",
    batch_size: int = 8,
    num_workers: int = 0,
    template: str | None = None,
    system: str | None = None,
    image_key: str | None = None,
    text_key: str = "txt;json:caption",
) -> int:
    """Score every sample of ``source`` not scored yet into ``out``; returns shards scored.

    Args:
        model: The VLM.
        prompt: The checked prompt YAML (:func:`~mmpt.curation.vlm_prompt.load_prompt`).
        source: Shards to score (folder, file, pattern).
        out: Output folder of per-shard parquet files.
        name: Column prefix.
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``).
        batch_size: Samples per batch and rank (a judgement sample is one row per metric).
        num_workers: Loader workers per rank.
        template: Chat template (default: the one the model trained with, else ``plain``).
        system: System prompt.
        image_key: Image member (default: the first of jpg, jpeg, png, webp).
        text_key: Caption field.

    Raises:
        ValueError: Unknown template; score tokens that are not one token each.
    """
    from mmpt.datamodules.templates import get_template

    scorer = VLMScorer(model, prompt, name)  # a bad scale fails before reading any shard
    todo, expected = plan(source, out)
    if not todo:
        print(f"mmpt data score: every shard of {source} is already scored in {out}")
        return 0
    chat = get_template(template or getattr(model, "data_template", None) or "plain", "--template")
    sample_fn = ScoreRows(model.preprocess, chat, system, prompt, image_key, text_key)
    data = ScoreData(
        todo, sample_fn, ScoreCollate(model.preprocess.pad_id), batch_size, num_workers
    )
    writer = ScoreWriter(out, lambda p: {c: p[c] for c in scorer.columns}, expected)
    run_predict(scorer, data, writer, accelerator)
    return len(todo)
