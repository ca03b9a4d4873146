"""``mmpt eval probe`` sweep mode: any model on any tile source, every resize x normalize.

Models: an mmpt checkpoint, a timm model, or a torchgeo weight. Tile sources: mmpt tile shards
or a torchgeo dataset. Tiles are held in memory in raw units (float32), then resized and
normalised per setting by :mod:`mmpt.eval.probe_sweep`.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mmpt.eval.probe_sweep import (
    Encoder,
    ModelInput,
    markdown_table,
    parse_normalize,
    parse_resize,
    run_sweep,
    write_sweep,
)
from mmpt.eval.torchgeo_io import PREFIX, match_bands


def shard_tiles(urls: str, flag: str, label_key: str = "label") -> tuple[Tensor, Tensor, list[str]]:
    """Raw tiles (N, C, H, W) float32, labels (N,) and band names of labelled tile shards.

    Args:
        urls: A shard folder (its ``*.tar``) or a brace pattern of ``.tar`` files.
        flag: The CLI flag, for messages.
        label_key: Field of the sample json holding the class id.

    Raises:
        FileNotFoundError: No shard.
        ValueError: No labelled tile, or tiles of different sizes or bands.
    """
    import webdataset as wds

    from mmpt.datamodules.tiles import read_tile

    path = Path(urls)
    files = sorted(glob.glob(str(path / "*.tar"))) if path.is_dir() else urls
    if not files or (isinstance(files, str) and "{" not in files and not path.is_file()):
        raise FileNotFoundError(f"{flag} {urls}: no .tar shards there")
    tiles, labels, bands = [], [], None
    for sample in wds.WebDataset(files, shardshuffle=False, empty_check=False):
        if "json" not in sample:
            continue
        label = json.loads(sample["json"]).get(label_key)
        if label is None:
            continue
        array, names = read_tile(sample)
        if bands is not None and names != bands:
            raise ValueError(f"{flag} {urls}: tiles with different bands ({bands} vs {names})")
        bands = names
        tiles.append(torch.from_numpy(array.astype(np.float32)))
        labels.append(int(label))
    if not tiles:
        raise ValueError(f"{flag} {urls}: no tile with a json {label_key!r}")
    if len({t.shape for t in tiles}) > 1:
        raise ValueError(f"{flag} {urls}: tiles of several shapes; the sweep needs one size")
    return torch.stack(tiles), torch.tensor(labels), list(bands or [])


def _any_size(tower: nn.Module, pool: str | None) -> Encoder:
    """``tower.pooled_features`` at any input size (the ``none``/pixel resizes of a ViT).

    Each new size gets a copy whose timm model has its position embeddings resampled by
    ``set_input_size``; the pretrained tower itself stays intact.
    """
    copies: dict[tuple[int, int], nn.Module] = {}

    def encode(x: Tensor) -> Tensor:
        size = tuple(x.shape[-2:])
        grid = getattr(getattr(tower.model, "patch_embed", None), "img_size", size)
        if tuple(grid) == size or not hasattr(tower.model, "set_input_size"):
            return tower.pooled_features(x, pool)
        if size not in copies:
            copies[size] = copy.deepcopy(tower)
            copies[size].model.set_input_size(img_size=size)
        return copies[size].pooled_features(x, pool)

    return encode


def load_model(args: argparse.Namespace) -> tuple[nn.Module, Encoder, ModelInput, str]:
    """The model, its feature function, pretraining input and a display name.

    From ``--ckpt`` (an mmpt checkpoint's tower, its own preprocessing), ``--timm NAME
    --weights torchgeo:Enum.MEMBER`` (bands, size and normalisation from the enum) or
    ``--timm NAME [--weights FILE]`` (timm's pretrained cfg mean/std on ``x / 255``).
    """
    if args.ckpt:
        from mmpt.models.encoders.from_checkpoint import tower_from_checkpoint

        tower = tower_from_checkpoint(args.ckpt)
        if not hasattr(tower, "pooled_features"):
            raise ValueError(f"--ckpt {args.ckpt}: its tower has no pooled_features")
        pre = tower.image_preprocess
        scale = pre.scale if pre.bands else 1 / 255
        model = ModelInput(pre.size, tuple(pre.mean), tuple(pre.std), scale, pre.bands)
        pool = None if args.pool == "model" else args.pool
        return tower, _any_size(tower, pool), model, Path(args.ckpt).name
    if not args.timm:
        raise ValueError("eval probe: give --ckpt (an mmpt checkpoint) or --timm NAME")
    weights = args.weights
    if weights and weights.startswith(PREFIX):
        from mmpt.eval.torchgeo_io import weights_enum, weights_input, weights_model

        enum = weights_enum(weights)
        net = weights_model(enum, args.timm, args.weights_file)
        return net, net, weights_input(enum), f"{args.timm} ({weights})"
    import timm

    from mmpt.models.encoders.timm_weights import create_pretrained_model

    kwargs = {"num_classes": 0}
    if weights:
        net: nn.Module = create_pretrained_model(args.timm, weights, kwargs)
    else:
        net = timm.create_model(args.timm, pretrained=False, **kwargs)
    cfg = net.pretrained_cfg
    model = ModelInput(int(cfg.get("input_size", (3, 224, 224))[-1]), tuple(cfg["mean"]),
                       tuple(cfg["std"]), 1 / 255)  # fmt: skip
    return net.eval(), net, model, f"{args.timm} ({weights or 'random init'})"


def load_data(args: argparse.Namespace) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor],
                                                 list[str], str]:  # fmt: skip
    """Train and test (tiles, labels), band names and a display name of the tile source."""
    if args.dataset:
        from mmpt.eval.torchgeo_io import load_split

        if not args.root:
            raise ValueError(f"--dataset {args.dataset} needs --root (the dataset's folder)")
        tr_x, tr_y, _, bands = load_split(args.dataset, args.root, "train")
        te_x, te_y, _, _ = load_split(args.dataset, args.root, "test")
        return (tr_x, tr_y), (te_x, te_y), list(bands), args.dataset
    if not (args.train and args.test):
        raise ValueError("eval probe: give --train and --test shards, or --dataset and --root")
    label = args.label_key.split(":", 1)[-1]
    tr_x, tr_y, bands = shard_tiles(args.train, "--train", label)
    te_x, te_y, _ = shard_tiles(args.test, "--test", label)
    return (tr_x, tr_y), (te_x, te_y), bands, args.test


@torch.no_grad()
def run_probe_sweep(args: argparse.Namespace, device: torch.device) -> int:
    """Run the sweep and write ``probe_sweep.{json,md,png}`` into ``--out``."""
    resizes = parse_resize(args.resize or "pretrain")
    normalizes = parse_normalize(args.normalize or "checkpoint")
    net, encode, model, model_name = load_model(args)
    train, test, bands, data_name = load_data(args)
    train = (match_bands(train[0], bands, model.bands, data_name), train[1])
    test = (match_bands(test[0], bands, model.bands, data_name), test[1])
    channels = len(model.mean)
    if train[0].shape[1] != channels:
        raise ValueError(
            f"{data_name} tiles have {train[0].shape[1]} bands but {model_name} takes "
            f"{channels}; pick a model with {train[0].shape[1]} input channels"
        )
    net.to(device)

    def on_device(x: Tensor) -> Tensor:
        return encode(x.to(device))

    rows = run_sweep(on_device, model, train, test, resizes, normalizes, k=args.k,
                     epochs=args.epochs, seed=args.seed, batch_size=args.batch_size)  # fmt: skip
    out = Path(args.out or "probe_sweep")
    context: dict[str, Any] = dict(model=model_name, data=data_name, k=args.k,
                                   pretrain_size=model.size, num_train=len(train[1]),
                                   num_test=len(test[1]), bands=bands)  # fmt: skip
    paths = write_sweep(rows, out, **context)
    print(f"mmpt eval probe sweep: {model_name} on {data_name}\n")
    print(markdown_table(rows))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
