"""Distributed training of real mmpt modules: DDP parity on two gloo CPU ranks, the FSDP
strategies built from YAML (layer paths resolved, policies set), activation checkpointing by
layer class, a 3-step FSDP2 fit of the tiny VLM on two CPU ranks whose last.ckpt the mmpt
loader reads, and (GPU only, opt-in) the same under torch's first FSDP.

torch's first FullyShardedDataParallel cannot run on CPUs ("FSDP needs a non-CPU accelerator
device" at wrap time), so its fit is a ``gpu`` test; FSDP2 (``fully_shard``) runs on gloo.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from mmpt.batch import ImageTextBatch
from mmpt.cli import build_cli
from mmpt.models.contrastive import ContrastiveModule
from mmpt.strategies import FSDP, FSDP2, ActivationCheckpointing, resolve_layers
from tests.helpers import ddp_average_, init_gloo
from tests.test_configs import CONFIGS, ROOT, import_class, load_recipe, tiny_variant

pytestmark = [
    pytest.mark.filterwarnings("ignore:You are trying to `self.log"),
    pytest.mark.filterwarnings("ignore:LightningCLI's args parameter"),
]

WORLD, B = 2, 4
N = WORLD * B
BLOCK = "timm.models.vision_transformer.Block"
TEXT_BLOCK = "open_clip.transformer.ResidualAttentionBlock"
QWEN2_LAYER = "transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer"
#: The VLM quickstart's vision tower is a SigLIP made from a config.
SIGLIP_LAYER = "transformers.models.siglip.modeling_siglip.SiglipEncoderLayer"
SIGLIP_LAYER = "transformers.models.siglip.modeling_siglip.SiglipEncoderLayer"


def build(node: dict) -> object:
    """Instantiate a ``{class_path, init_args}`` node whose arguments are plain values."""
    return import_class(node["class_path"])(**node.get("init_args", {}))


def tiny_clip() -> ContrastiveModule:
    """The tiny CLIP of configs/quickstart/clip_tiny.yaml (same weights on every call)."""
    model = yaml.safe_load((CONFIGS / "quickstart" / "clip_tiny.yaml").read_text())["model"]
    args = model["init_args"]
    torch.manual_seed(0)
    module = ContrastiveModule(build(args["vision"]), build(args["text"]), build(args["loss"]))
    return module.train()


def global_batch(context_length: int = 20) -> ImageTextBatch:
    """N normalised 32 px images with one caption each (fixed by a seed)."""
    g = torch.Generator().manual_seed(7)
    return ImageTextBatch(
        images=torch.randn(N, 3, 32, 32, generator=g),
        text_tokens=torch.randint(1, 1000, (N, context_length), generator=g),
        text_to_image=torch.arange(N),
    )


def half(batch: ImageTextBatch, rank: int) -> ImageTextBatch:
    rows = slice(rank * B, (rank + 1) * B)
    return ImageTextBatch(batch.images[rows], batch.text_tokens[rows], torch.arange(B))


def loss_and_grads(module: ContrastiveModule, batch: ImageTextBatch) -> tuple[torch.Tensor, dict]:
    """The training loss (through ``training_step``) and every trained parameter's gradient."""
    loss = module.training_step(batch, 0)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    init_gloo(rank, init_file, WORLD)
    try:
        loss, grads = loss_and_grads(tiny_clip(), half(global_batch(), rank))
        local = loss.clone()
        dist.all_reduce(loss)  # the logged mean over ranks
        out = {"loss": loss / WORLD, "local": local, "grads": ddp_average_(grads)}
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_ddp_loss_and_gradients_equal_single_process_global_batch(tmp_path: Path) -> None:
    """Two gloo ranks, half the batch each: the mean loss and DDP-averaged gradients are the
    single-process loss and gradients on the whole batch (features gathered with gradient)."""
    mp.spawn(ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    ref_loss, ref_grads = loss_and_grads(tiny_clip(), global_batch())

    assert not torch.isclose(ranks[0]["local"], ranks[1]["local"])  # the ranks saw different rows
    assert "loss.logit_scale" in ref_grads and "vision.model.patch_embed.proj.weight" in ref_grads
    for res in ranks:
        torch.testing.assert_close(res["loss"], ref_loss, rtol=1e-5, atol=1e-5)
        assert res["grads"].keys() == ref_grads.keys()
        for k, g in ref_grads.items():
            torch.testing.assert_close(
                res["grads"][k], g, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}"
            )


def test_fsdp_takes_layer_paths_for_wrapping_and_checkpointing() -> None:
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    strategy = FSDP(layers=[QWEN2_LAYER, BLOCK], activation_checkpointing=True)
    classes = {Qwen2DecoderLayer, import_class(BLOCK)}
    assert strategy.layer_classes == classes
    wrap = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(wrap, ModuleWrapPolicy) and wrap._module_classes == classes
    recompute = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    assert isinstance(recompute, ModuleWrapPolicy) and recompute._module_classes == classes
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy._state_dict_type == "full"  # last.ckpt: one file mmpt tools read

    plain = FSDP(layers=[BLOCK], sharding_strategy="SHARD_GRAD_OP", process_group_backend="gloo")
    assert plain._activation_checkpointing_kwargs == {}
    assert plain.sharding_strategy == ShardingStrategy.SHARD_GRAD_OP
    assert plain.process_group_backend == "gloo"


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("nosuchpackage.layers.Block", "cannot import module 'nosuchpackage.layers'"),
        ("timm.models.vision_transformer.NoSuchBlock", "has no class 'NoSuchBlock'"),
        ("Block", "not a dotted class path"),
        ("torch.nn.functional.relu", "not a torch.nn.Module subclass"),
    ],
)
def test_unknown_layer_path_is_a_clear_error(path: str, says: str) -> None:
    with pytest.raises(ValueError, match="trainer.strategy.layers") as err:
        FSDP(layers=[BLOCK, path])
    assert says in str(err.value) and repr(path) in str(err.value)
    with pytest.raises(ValueError, match="ActivationCheckpointing.layers"):
        ActivationCheckpointing([path])


def test_activation_checkpointing_needs_layers() -> None:
    with pytest.raises(ValueError, match="needs layers"):
        FSDP(activation_checkpointing=True)


def test_fsdp_overlay_builds_the_strategy_through_the_cli(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """configs/fsdp.yaml on the VILA recipe (tiny towers): the Trainer gets mmpt's FSDP2 with the
    recipe's LLM and vision layer classes, activation checkpointing and bf16 mixed precision."""

    monkeypatch.chdir(tmp_path)
    overlay = CONFIGS / "fsdp.yaml"
    written = load_recipe(overlay)
    assert written["model"]["init_args"]["vision"]["class_path"].endswith("HFVisionTower")
    cfg = tiny_variant(written, shards)
    cfg["trainer"].update(
        strategy=written["trainer"]["strategy"], precision="bf16-mixed", devices=2
    )
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump(cfg))

    trainer = build_cli(["-c", str(tiny)], run=False).trainer
    strategy = trainer.strategy
    assert type(strategy) is FSDP2
    assert set(strategy.layer_classes) == resolve_layers([QWEN2_LAYER, SIGLIP_LAYER])
    assert strategy.activation_checkpointing and strategy.reshard_after_forward
    assert strategy.precision_plugin.precision == "bf16-mixed"
    assert strategy.num_processes == 2


def test_activation_checkpointing_callback_keeps_loss_gradients_and_keys() -> None:
    """The DDP route: towers' blocks wrapped in checkpoint wrappers, same numbers, same
    checkpoint keys (3 ViT blocks + 2 text blocks of the tiny CLIP)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    batch = global_batch()
    ref = tiny_clip()
    ref_keys = list(ref.state_dict())
    ref_loss, ref_grads = loss_and_grads(ref, batch)

    model = tiny_clip()
    callback = ActivationCheckpointing([BLOCK, TEXT_BLOCK])
    callback.setup(None, model, "fit")
    callback.setup(None, model, "fit")  # idempotent
    assert sum(isinstance(m, CheckpointWrapper) for m in model.modules()) == 5
    assert list(model.state_dict()) == ref_keys
    loss, grads = loss_and_grads(model, batch)
    torch.testing.assert_close(loss, ref_loss)
    names = {k.replace("._checkpoint_wrapped_module", ""): g for k, g in grads.items()}
    assert names.keys() == ref_grads.keys()
    for k, g in ref_grads.items():
        torch.testing.assert_close(names[k], g, msg=lambda m, k=k: f"{k}: {m}")


def fit_tiny_vlm(tmp_path: Path, trainer: dict, data: dict) -> str:
    """`mmpt fit` of the quickstart VLM for 3 steps with these overrides, then check it:
    finite loss, trained weights moved, frozen ones not, last.ckpt loads into the model."""
    from mmpt.models.module import load_checkpoint
    from mmpt.synth import make_synthetic

    make_synthetic("image-text", tmp_path / "data/shapes", train_samples=64, image_size=32,
                   samples_per_shard=8)  # fmt: skip
    ckpt_dir = tmp_path / "ckpt"
    over = {
        "trainer": {
            "max_steps": 3, "limit_val_batches": 0, "val_check_interval": None,
            "log_every_n_steps": 1, "enable_progress_bar": False,
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(ckpt_dir), "save_last": True,
                                         "save_top_k": 0, "every_n_train_steps": 3}}],
            **trainer,
        },
        "data": {"init_args": {"batch_size": 2, "num_workers": 0, **data}},
    }  # fmt: skip
    (tmp_path / "over.yaml").write_text(yaml.safe_dump(over))
    base = str(CONFIGS / "quickstart" / "vila_stage1.yaml")
    cmd = [sys.executable, "-m", "mmpt.cli", "fit", "-c", base, "-c", "over.yaml"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-4000:]

    metrics = next(tmp_path.glob("runs/vila_tiny/**/metrics.csv")).read_text().splitlines()
    col = metrics[0].split(",").index("train/loss")
    losses = [float(r.split(",")[col]) for r in metrics[1:] if r.split(",")[col]]
    assert losses and all(torch.isfinite(torch.tensor(losses)))

    cli = build_cli(["-c", base, "--data.init_args.num_workers", "0"], run=False)
    model = cli.model
    model.configure_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_checkpoint(model, str(ckpt_dir / "last.ckpt"))  # one full file, every weight in it
    after = model.state_dict()
    moved = [k for k in before if k.startswith(("connector.", "llm.")) and
             not torch.equal(before[k], after[k])]  # fmt: skip
    assert moved, "no trained weight differs from its initial value"
    frozen = [k for k in before if k.startswith("vision.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    return run.stdout + run.stderr


@pytest.mark.timeout(300)
def test_fsdp2_fits_the_tiny_vlm_on_two_cpu_processes(tmp_path: Path) -> None:
    """mmpt.strategies.FSDP2 (fully_shard, gloo) with activation checkpointing, 2 CPU ranks."""
    strategy = {
        "class_path": "mmpt.strategies.FSDP2",
        "init_args": {"layers": [QWEN2_LAYER, SIGLIP_LAYER], "activation_checkpointing": True},
    }
    train = {"urls": "data/shapes/train", "resampled": True, "epoch_samples": 64}
    log = fit_tiny_vlm(
        tmp_path,
        {"accelerator": "cpu", "devices": 2, "precision": "32-true", "strategy": strategy},
        {"train": train},
    )  # fmt: skip
    sharded = re.search(r"FSDP2: (\d+) layers sharded as units over 2 processes, activation", log)
    assert sharded and int(sharded.group(1)) >= 4, log[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.timeout(300)
def test_fsdp_fits_the_tiny_vlm_and_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    """mmpt.strategies.FSDP (bf16, activation checkpointing) on one GPU."""
    strategy = {
        "class_path": "mmpt.strategies.FSDP",
        "init_args": {"layers": [QWEN2_LAYER, SIGLIP_LAYER], "activation_checkpointing": True},
    }
    fit_tiny_vlm(
        tmp_path,
        {"accelerator": "gpu", "devices": 1, "precision": "bf16-mixed", "strategy": strategy},
        {},
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "config,synthetic,layer",
    [
        ("ssl4eo_mae_tiny", {"kind": "multispectral", "out": "data/landcover"}, BLOCK),
        ("speech_tiny", {"kind": "audio-text", "out": "data/tones"}, TEXT_BLOCK),
        ("egovlp_tiny", {"kind": "video-text", "out": "data/video", "image_size": 64}, TEXT_BLOCK),
    ],
)
def test_fsdp2_trains_the_other_families_on_two_cpu_processes(
    tmp_path: Path, config: str, synthetic: dict, layer: str
) -> None:
    """MAE, audio-text and video-text quickstarts take 2 FSDP2 steps on 2 gloo ranks."""
    train = {"urls": f"{synthetic['out']}/train", "resampled": True, "epoch_samples": 64}
    over = {
        "trainer": {
            "accelerator": "cpu", "devices": 2, "max_steps": 2, "precision": "32-true",
            "limit_val_batches": 0, "check_val_every_n_epoch": None, "val_check_interval": None,
            "enable_progress_bar": False, "logger": False, "enable_checkpointing": False,
            "callbacks": [],
            "strategy": {"class_path": "mmpt.strategies.FSDP2",
                         "init_args": {"layers": [layer], "activation_checkpointing": True}},
        },
        "data": {"init_args": {"batch_size": 8, "num_workers": 0, "train": train,
                               "synthetic": {**synthetic, "train_samples": 96}}},
    }  # fmt: skip
    (tmp_path / "over.yaml").write_text(yaml.safe_dump(over))
    base = str(CONFIGS / "quickstart" / f"{config}.yaml")
    cmd = [sys.executable, "-m", "mmpt.cli", "fit", "-c", base, "-c", "over.yaml"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=580)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert re.search(r"FSDP2: [1-9]\d* layers sharded as units over 2 processes", log)
    assert "`max_steps=2` reached" in log
