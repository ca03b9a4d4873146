"""``mmpt eval mir``: EPIC-KITCHENS-100 multi-instance retrieval (mAP, nDCG both ways).

The video-text model embeds every clip of ``--data`` (in shard order: the rows of the
relevancy matrix) and the captions (the clips' own, or EPIC's sentence list with
``--sentences``: the columns); :func:`~mmpt.eval.video_metrics.multi_instance_retrieval`
scores their similarity against EPIC's semantic relevancy matrix.

The relevancy file is read without running code: ``.npy`` (``allow_pickle=False``), ``.npz``,
or a ``.pkl`` through an unpickler that rebuilds numpy arrays and nothing else (EPIC's
``caption_relevancy_EPIC_100_retrieval_test.pkl`` is a pickled array). A pandas pickle is
refused with the one-line conversion to ``.npy``.
"""

from __future__ import annotations

import argparse
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: ``module.name`` globals a relevancy pickle may use: numpy array reconstruction only.
NUMPY_GLOBALS = frozenset(
    f"{module}.{name}"
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
) | {"numpy.ndarray", "numpy.dtype"}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays; any other global is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        if f"{module}.{name}" not in NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


def load_relevancy(path: str | Path, flag: str = "--relevancy") -> torch.Tensor:
    """EPIC's relevancy matrix (Nv, Nt) as float64, read without running code.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Another suffix, a pickle that needs more than numpy arrays (e.g. a
            pandas DataFrame: the message gives the conversion), or not a 2-D numeric array.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: no relevancy file at {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = np.load(path, allow_pickle=False)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            key = "relevancy" if "relevancy" in z.files else z.files[0]
            array = z[key]
    elif suffix in (".pkl", ".pickle"):
        try:
            array = _ArrayUnpickler(io.BytesIO(path.read_bytes())).load()
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"{flag} {path}: refused to unpickle {err} (only numpy arrays are read, no "
                'code runs). If you trust the file, convert it once: python -c "import numpy '
                f"as np, pandas as pd; np.save('{path.with_suffix('.npy')}', "
                f"np.asarray(pd.read_pickle('{path}')))\" and pass the .npy"
            ) from None
    else:
        raise ValueError(f"{flag} {path}: expected a .npy, .npz or .pkl relevancy matrix")
    if not isinstance(array, np.ndarray) or array.ndim != 2 or array.dtype.kind not in "biuf":
        what = getattr(array, "shape", type(array).__name__)
        raise ValueError(
            f"{flag} {path}: expected a 2-D numeric (videos, captions) array, got {what}"
        )
    return torch.from_numpy(array.astype(np.float64))


def load_sentences(path: str | Path, flag: str = "--sentences") -> list[str]:
    """Caption texts, one per relevancy column: a ``.txt`` (a line each) or a ``.csv``.

    A CSV's ``narration`` column is read (EPIC's ``EPIC_100_retrieval_test_sentence.csv``),
    else its last column.
    """
    import csv

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: no sentence file at {str(path)!r}")
    if path.suffix.lower() != ".csv":
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{flag} {path}: no rows")
    column = "narration" if "narration" in rows[0] else list(rows[0])[-1]
    return [row[column] for row in rows]


def add_mir_args(s: argparse.ArgumentParser) -> None:
    """The arguments ``mir`` adds to the common ``mmpt eval`` ones."""
    s.add_argument("--relevancy", required=True, help="EPIC relevancy matrix: .npy, .npz or .pkl")
    s.add_argument(
        "--sentences",
        default=None,
        help="caption list of the relevancy columns (.txt or EPIC's sentence .csv); default: "
        "each clip's own captions, in shard order",
    )
    s.add_argument("--text-key", default=None, help="caption field, e.g. 'json:narration'")
    s.add_argument(
        "--map-threshold",
        type=float,
        default=1.0,
        help="relevance counted as a hit for mAP (EPIC: 1.0, same verb and noun classes)",
    )


def check_mir_args(args: argparse.Namespace) -> torch.Tensor:
    """Read the relevancy (and sentences) before any embedding; returns the matrix."""
    relevancy = load_relevancy(args.relevancy)
    if args.sentences is not None:
        args.sentence_list = load_sentences(args.sentences)
        if len(args.sentence_list) != relevancy.shape[1]:
            raise ValueError(
                f"--sentences has {len(args.sentence_list)} captions but --relevancy "
                f"{args.relevancy} has {relevancy.shape[1]} columns"
            )
    return relevancy


def mir_metrics(
    video: torch.Tensor, text: torch.Tensor, relevancy: torch.Tensor, map_threshold: float = 1.0
) -> dict[str, float]:
    """Multi-instance retrieval of video (Nv, D) and text (Nt, D) embeddings (L2-normalised here).

    Raises:
        ValueError: The similarity (Nv, Nt) and the relevancy differ in shape (says which).
    """
    from mmpt.eval.video_metrics import multi_instance_retrieval

    sim = (
        torch.nn.functional.normalize(video.float(), dim=-1)
        @ torch.nn.functional.normalize(text.float(), dim=-1).T
    )
    if sim.shape != relevancy.shape:
        raise ValueError(
            f"--relevancy is {tuple(relevancy.shape)} (videos, captions) but --data gave "
            f"{sim.shape[0]} clips and {sim.shape[1]} captions: the rows must be the shards' "
            "clips in order and the columns their captions (or --sentences)"
        )
    return multi_instance_retrieval(sim, relevancy, map_threshold=map_threshold)


def plot_mir(metrics: dict[str, float], path: Path) -> Path:
    """Bar chart of mAP and nDCG in both directions and their mean (x 100)."""
    from mmpt.eval.report import new_figure, save_figure

    fig = new_figure(5.0, 3.5)
    ax = fig.add_subplot()
    names = ["v2t", "t2v", "avg"]
    for i, metric in enumerate(("mAP", "nDCG")):
        values = [100 * metrics[f"{n}/{metric}"] for n in names]
        ax.bar([j + 0.4 * i for j in range(3)], values, width=0.4, label=metric)
    ax.set_xticks([j + 0.2 for j in range(3)], names)
    ax.set(ylabel="x 100", ylim=(0, 100), title="EPIC-100 multi-instance retrieval")
    ax.legend(loc="best")
    return save_figure(fig, path)


def report_mir(
    args: argparse.Namespace,
    video: torch.Tensor,
    text: torch.Tensor,
    relevancy: torch.Tensor,
    encode_text: Any,
    out_dir: Path,
    **context: Any,
) -> tuple[dict[str, float], dict[str, Path]]:
    """Score the embedded set and write ``mir.json`` and ``mir.png``.

    Args:
        args: The parsed ``mmpt eval mir`` arguments (``sentence_list`` when ``--sentences``).
        video: Float tensor (Nv, D), one embedding per clip in shard order.
        text: Float tensor (M, D), the clips' captions (used without ``--sentences``).
        relevancy: Float tensor (Nv, Nt).
        encode_text: Captions (list of str) -> float tensor (Nt, D).
        out_dir: Report folder.
        **context: Extra report fields (checkpoint, data).

    Returns:
        The metrics and the paths written.
    """
    from mmpt.eval.report import write_json

    sentences = getattr(args, "sentence_list", None)
    if sentences is not None:
        text = torch.cat(
            [encode_text(sentences[i : i + 256]) for i in range(0, len(sentences), 256)]
        )
    metrics = mir_metrics(video, text, relevancy, args.map_threshold)
    context |= {
        "relevancy": args.relevancy,
        "num_videos": video.shape[0],
        "num_texts": text.shape[0],
    }
    paths = {
        "json": write_json(out_dir / "mir.json", metrics, **context),
        "plot": plot_mir(metrics, out_dir / "mir.png"),
    }
    return metrics, paths
