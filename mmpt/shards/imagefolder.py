"""ImageFolder (``root/<class>/<image>``, torchvision's layout) -> classification shards.

Classes are the sub-folders in sorted order (label = position, as torchvision's
``ImageFolder`` numbers them). ``index.json`` ``meta.zeroshot`` holds the class names and
prompt templates that ``mmpt eval zeroshot`` reads: the folder names, or open_clip's ImageNet
class names when the folders are the 1,000 ImageNet synsets (``n01440764`` ...), and open_clip's
80 OpenAI ImageNet templates.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mmpt.shards.build import BuildReport
from mmpt.shards.documents import Doc, build_documents
from mmpt.shards.sources import IMAGE_SUFFIXES

_WNID = re.compile(r"^n\d{8}$")


def default_templates() -> list[str]:
    """open_clip's OpenAI ImageNet prompt templates, with ``{}`` for the class name."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


def class_names(folders: list[str], classnames: str | Path | None) -> list[str]:
    """Names of the classes: a file (one a line), ImageNet's for synset folders, else folders.

    Raises:
        FileNotFoundError: ``classnames`` does not exist.
        ValueError: ``classnames`` has a different number of lines than there are classes.
    """
    if classnames is not None:
        path = Path(classnames)
        if not path.is_file():
            raise FileNotFoundError(f"--classnames {path} does not exist")
        names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if len(names) != len(folders):
            raise ValueError(
                f"--classnames {path} has {len(names)} names for {len(folders)} class folders; "
                "give one name a line, in the sorted order of the folders"
            )
        return names
    if len(folders) == 1000 and all(_WNID.match(f) for f in folders):
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    return [f.replace("_", " ") for f in folders]


def _compose(doc: Doc, key: str) -> dict[str, Any]:
    info = {"key": key, **doc.data}
    return {"jpg": doc.encoded[0], "cls": str(doc.data["label"]), "txt": doc.data["caption"],
            "json": info}  # fmt: skip


def build_classification_shards(
    source: str | Path,
    out: str | Path,
    classnames: str | Path | None = None,
    samples_per_shard: int = 5000,
    resize_short_side: int | None = None,
    jpeg_quality: int = 95,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> BuildReport:
    """Write an ImageFolder as shards of ``jpg``, ``cls`` and json ``label``/``classname``.

    Each sample's ``txt`` is the first template filled with its class name, so image-text
    readers (``mmpt eval``) read the set too. Skips, counted by reason: ``corrupt_image``.

    Args:
        source: The root folder, one sub-folder per class.
        out: Output shard folder.
        classnames: Text file of class names, one a line in the sorted order of the folders.
        samples_per_shard: Images per shard.
        resize_short_side: Downscale images whose short side is larger.
        jpeg_quality: Quality of re-encoded JPEGs.
        workers: Processes reading images.
        progress: Show a progress bar.
        overwrite: Replace shards already in ``out``.

    Returns:
        A :class:`~mmpt.shards.build.BuildReport`.

    Raises:
        FileNotFoundError: ``source`` is not a folder.
        ValueError: It has no class folder with images.
    """
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"--from {root}: not a folder; give an ImageFolder root")
    files = {
        d.name: sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        for d in sorted(root.iterdir())
        if d.is_dir()
    }
    folders = [name for name, images in files.items() if images]
    if not folders:
        raise ValueError(
            f"--from {root} has no class folders with images ({', '.join(IMAGE_SUFFIXES)}); "
            "give a folder of <class>/<image> files"
        )
    names = class_names(folders, classnames)
    templates = default_templates()
    docs = [
        Doc(
            str(p),
            {
                "label": label,
                "classname": names[label],
                "folder": folder,
                "caption": templates[0].format(names[label]),
                "filename": str(p.relative_to(root)),
            },
            [str(p)],
        )  # fmt: skip
        for label, folder in enumerate(folders)
        for p in files[folder]
    ]
    meta = {
        "kind": "classification",
        "source": str(root.resolve()),
        "zeroshot": {"classnames": names, "templates": templates},
        "folders": folders,
        "build": {"format": "imagefolder"},
    }
    return build_documents(
        docs, out, _compose, meta, ["image", "text"], samples_per_shard, resize_short_side,
        jpeg_quality, workers, progress, overwrite, total=len(docs),
    )  # fmt: skip
