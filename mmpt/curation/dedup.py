"""``mmpt data dedup``: exact, perceptual-hash and embedding near-duplicates, as a score table.

Each sample gets one fingerprint of its image:

- ``exact``: SHA-256 of the image member's bytes;
- ``phash``: the 64-bit DCT perceptual hash of imagehash (``imagehash.phash``), which survives
  JPEG re-encoding and resizing; similarity ``1 - hamming / 64``;
- ``embedding``: L2-normalised image embeddings from an ``mmpt predict`` folder; cosine.

A sample is a duplicate when an earlier sample (in shard order) of the set is at least
``threshold`` similar, or, with ``--against``, when any sample of that (evaluation) set is. The
search is exact and chunked (a block of queries against all items at a time, in torch), so
memory stays bounded; it uses faiss when installed (inner-product flat index, same results).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmpt.curation.tables import shard_name, write_table

log = logging.getLogger(__name__)
METHODS = ("exact", "phash", "embedding")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Fingerprints:
    """One fingerprint per sample, in shard order.

    Attributes:
        shards: Shard file name of each sample.
        keys: ``__key__`` of each sample.
        vectors: (N, D) float32 vectors compared by inner product (phash: +-1 bits, D = 64;
            embedding: unit vectors) or None for ``exact``.
        digests: SHA-256 hex digest per sample for ``exact``, else None.
    """

    shards: list[str]
    keys: list[str]
    vectors: np.ndarray | None = None
    digests: list[str] | None = None


def _samples(source: str, image_key: str | None) -> Iterator[tuple[str, str, bytes]]:
    """(shard name, key, image bytes) of every sample of ``source`` with an image."""
    from mmpt.datamodules.stages import SkipCounter, read_shards
    from mmpt.datamodules.urls import resolve_source

    resolved = resolve_source(source, "--from")
    counter = SkipCounter()
    for sample in read_shards(resolved.urls, counter):
        names = [image_key] if image_key else [k for k in IMAGE_KEYS if k in sample]
        data = sample.get(names[0]) if names else None
        if data is None:
            counter(ValueError(f"no image member ({image_key or '/'.join(IMAGE_KEYS)})"))
            continue
        yield shard_name(sample["__url__"]), sample["__key__"], data
    for fault in counter.shards.values():
        log.warning("unreadable shard %s", fault.describe())
    if counter.total:
        log.warning("%s: %d samples without a readable image were left out", source, counter.total)


def phash_bits(data: bytes) -> np.ndarray:
    """(64,) float32 +-1 bits of the perceptual hash of an encoded image."""
    import imagehash
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        bits = imagehash.phash(img.convert("RGB")).hash.reshape(-1)
    return np.where(bits, 1.0, -1.0).astype(np.float32)


def fingerprints(source: str, method: str, image_key: str | None = None) -> Fingerprints:
    """Fingerprints of every sample of ``source`` (``exact`` or ``phash``)."""
    shards, keys, rows = [], [], []
    for shard, key, data in _samples(source, image_key):
        shards.append(shard)
        keys.append(key)
        rows.append(hashlib.sha256(data).hexdigest() if method == "exact" else phash_bits(data))
    if method == "exact":
        return Fingerprints(shards, keys, digests=rows)
    vectors = np.stack(rows) if rows else np.zeros((0, 64), np.float32)
    return Fingerprints(shards, keys, vectors=vectors)


def embedding_fingerprints(folder: str | Path, source: str) -> Fingerprints:
    """Fingerprints from an ``mmpt predict`` folder (its keys and ``image_emb``) of ``source``.

    The shard of each key is read from ``source`` (keys must be unique in it).

    Raises:
        ValueError: No image embeddings, a key twice in the source, or a key it lacks.
    """
    from mmpt.predict_writer import load_predictions

    got = load_predictions(folder)
    if "image_emb" not in got:
        raise ValueError(f"--embeddings {folder}: no image_emb.npy (run `mmpt predict` on images)")
    shard_of: dict[str, str] = {}
    for shard, key, _ in _samples(source, None):
        if key in shard_of:
            raise ValueError(f"{source}: key {key!r} in two shards; embeddings are matched by key")
        shard_of[key] = shard
    missing = [k for k in got["keys"] if k not in shard_of]
    if missing:
        raise ValueError(
            f"--embeddings {folder}: {len(missing)} keys are not in {source} (e.g. {missing[0]!r});"
            " predict on the same shards"
        )
    vectors = got["image_emb"].astype(np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    shards = [shard_of[k] for k in got["keys"]]
    return Fingerprints(shards, list(got["keys"]), vectors=vectors)


def similarity(method: str, inner: torch.Tensor) -> torch.Tensor:
    """Similarity in [0, 1] (phash: 1 - hamming / 64) or [-1, 1] (cosine) from inner products."""
    return (inner + 64) / 128 if method == "phash" else inner


def nearest(
    queries: np.ndarray, items: np.ndarray, method: str, earlier_only: bool, chunk: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Best match of each query among ``items``: (similarity, index), -inf / -1 if none.

    With ``earlier_only`` (queries = items), query i only looks at items j < i. Exact search in
    blocks of ``chunk`` queries (memory O(chunk x N)); faiss's flat index when installed and
    ``earlier_only`` is False.
    """
    n = len(queries)
    best = np.full(n, -np.inf, dtype=np.float64)
    index = np.full(n, -1, dtype=np.int64)
    if n == 0 or len(items) == 0:
        return best, index
    if not earlier_only:
        found = _faiss_nearest(queries, items)
        if found is not None:
            sims, idx = found
            return similarity(method, torch.from_numpy(sims)).numpy().astype(np.float64), idx
    all_items = torch.from_numpy(items)
    for start in range(0, n, chunk):
        q = torch.from_numpy(queries[start : start + chunk])
        stop = start + len(q) if earlier_only else len(items)
        if stop == 0:
            continue
        sims = similarity(method, q @ all_items[:stop].T).double()
        if earlier_only:  # only j < i: mask j >= i
            rows = torch.arange(start, start + len(q)).unsqueeze(1)
            sims.masked_fill_(torch.arange(stop).unsqueeze(0) >= rows, -torch.inf)
        value, arg = sims.max(dim=1)
        best[start : start + len(q)] = value.numpy()
        index[start : start + len(q)] = torch.where(value.isinf(), -1, arg).numpy()
    return best, index


def _faiss_nearest(queries: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        import faiss
    except ImportError:
        return None
    index = faiss.IndexFlatIP(items.shape[1])
    index.add(np.ascontiguousarray(items, dtype=np.float32))
    sims, idx = index.search(np.ascontiguousarray(queries, dtype=np.float32), 1)
    return sims[:, 0], idx[:, 0]


def find_duplicates(
    data: Fingerprints, method: str, threshold: float, against: Fingerprints | None = None
) -> dict[str, list]:
    """The dedup score table: ``shard``, ``key``, ``duplicate``, ``dup_of``, ``dup_similarity``.

    ``dup_of`` is ``shard/key`` of the match (``eval:shard/key`` for a match in ``against``).
    """
    n = len(data.keys)
    dup = np.zeros(n, dtype=bool)
    sim = np.zeros(n, dtype=np.float64)
    of = [""] * n
    if method == "exact":
        first: dict[str, int] = {}
        seen = {d: j for j, d in enumerate(against.digests or [])} if against else {}
        for i, digest in enumerate(data.digests or []):
            if digest in seen:
                dup[i], sim[i] = True, 1.0
                of[i] = f"eval:{against.shards[seen[digest]]}/{against.keys[seen[digest]]}"
            elif digest in first:
                j = first[digest]
                dup[i], sim[i], of[i] = True, 1.0, f"{data.shards[j]}/{data.keys[j]}"
            else:
                first[digest] = i
    else:
        vectors = data.vectors if data.vectors is not None else np.zeros((0, 1), np.float32)
        within, j = nearest(vectors, vectors, method, earlier_only=True)
        sim = np.where(np.isinf(within), 0.0, within)
        dup = within >= threshold
        of = [f"{data.shards[k]}/{data.keys[k]}" if d else "" for d, k in zip(dup, j, strict=True)]
        if against is not None and against.vectors is not None:
            ev, ej = nearest(vectors, against.vectors, method, earlier_only=False)
            hit = ev >= threshold
            for i in np.flatnonzero(hit):
                k = int(ej[i])
                dup[i], sim[i] = True, float(ev[i])
                of[i] = f"eval:{against.shards[k]}/{against.keys[k]}"
    return {
        "shard": data.shards,
        "key": data.keys,
        "duplicate": dup.tolist(),
        "dup_of": of,
        "dup_similarity": sim.astype(np.float32).tolist(),
    }


def dedup(
    source: str,
    out: str | Path,
    method: str = "phash",
    threshold: float | None = None,
    against: str | None = None,
    embeddings: str | None = None,
    against_embeddings: str | None = None,
    image_key: str | None = None,
) -> dict[str, int]:
    """Write ``out/dedup.parquet`` for ``source``; returns counts (samples, duplicates).

    Raises:
        ValueError: Unknown method, a threshold outside [0, 1], or ``embedding`` without
            ``--embeddings``.
    """
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    threshold = (
        {"exact": 1.0, "phash": 0.9, "embedding": 0.95}[method] if threshold is None else threshold
    )
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold {threshold}: a similarity, in [0, 1] (cosine: [-1, 1])")
    if method == "embedding":
        if embeddings is None:
            raise ValueError("--method embedding needs --embeddings DIR (an `mmpt predict` folder)")
        data = embedding_fingerprints(embeddings, source)
        if (against is None) != (against_embeddings is None):
            raise ValueError("--method embedding --against needs --against-embeddings too")
        other = embedding_fingerprints(against_embeddings, against) if against else None
    else:
        data = fingerprints(source, method, image_key)
        other = fingerprints(against, method, image_key) if against else None
    table = find_duplicates(data, method, threshold, other)
    write_table(table, Path(out) / "dedup.parquet")
    return {"samples": len(table["key"]), "duplicates": int(sum(table["duplicate"]))}
