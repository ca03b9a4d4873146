"""GPU checks (opt-in: ``pytest -m gpu``, run on the device machine): bf16 contrastive steps,
uint8 batches normalised on the device, the loss in fp32 under autocast, and a tiny packed
CausalLM on the xformers path (bf16 forward, gradients, training steps) and on FlexAttention
and SDPA (gradients)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmpt.datamodules.packing import pack_sequences
from mmpt.datamodules.transforms import normalize_images
from mmpt.models import attention
from mmpt.models.attention import hf_packing_kwargs
from mmpt.models.llm import CausalLM
from mmpt.models.losses import ClipLoss, SigLipLoss
from tests.test_attention import split_rows
from tests.test_llm import tiny_config, write_tokenizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_normalize_on_device_matches_cpu():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    gpu = normalize_images(x.cuda(), mean, std).cpu()
    assert torch.allclose(gpu, normalize_images(x, mean, std), atol=1e-6)


@pytest.mark.parametrize("loss_cls", [ClipLoss, SigLipLoss])
def test_loss_under_bf16_autocast_is_fp32_and_close(loss_cls):
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(64, 32, device="cuda"), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(64, 32, device="cuda"), dim=-1)
    loss = loss_cls().cuda()
    ref = loss(img, txt)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = loss(img.bfloat16(), txt.bfloat16())
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, rtol=2e-2)


def test_bf16_contrastive_training_steps_learn(tmp_path):
    import lightning as L

    from mmpt.cli import build_cli
    from tests.helpers import TINY_TEXT, TINY_VISION, write_shards

    shards = write_shards(tmp_path / "shards", n=64, per_shard=16)
    args = [
        "--model",
        "mmpt.models.contrastive.ContrastiveModule",
        f"--model.init_args.vision={TINY_VISION}".replace("'", '"'),
        f"--model.init_args.text={TINY_TEXT}".replace("'", '"'),
        "--data",
        "mmpt.datamodules.image_text.ImageTextDataModule",
        f'--data.init_args.train={{"urls": "{shards}"}}',
        "--data.init_args.batch_size=16",
        "--data.init_args.num_workers=2",
        "--trainer.accelerator=gpu",
        "--trainer.devices=1",
        "--trainer.precision=bf16-mixed",
        "--trainer.max_steps=20",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
    ]
    cli = build_cli(args, run=False)
    before = [p.detach().clone() for p in cli.model.parameters()]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert isinstance(cli.trainer, L.Trainer) and cli.trainer.global_step == 20
    assert torch.isfinite(torch.tensor(float(cli.trainer.callback_metrics["train/loss"])))
    after = list(cli.model.parameters())
    changed = [not torch.equal(a, b.cpu()) for a, b in zip(before, after, strict=True)]
    assert sum(changed) >= 0.9 * len(changed)


# ---------------------------------------------------------------- packed CausalLM on xformers

XFORMERS_UNUSABLE = (
    attention.unusable_reason("xformers", torch.device("cuda"))
    if torch.cuda.is_available()
    else "needs a CUDA device"
)
needs_xformers = pytest.mark.skipif(
    XFORMERS_UNUSABLE is not None,
    reason=f"xformers cannot run here ({XFORMERS_UNUSABLE}); see scripts/fetch_gpu_wheels.sh",
)
VOCAB = 128
PACK_LENGTHS = (9, 1, 14, 6, 11, 3, 16, 4)  # 64 tokens, a 1-token sample included
PACK_LEN = 32


def tiny_llm(tok_dir: Path, dtype: str, device: str = "cuda", backend: str = "auto") -> CausalLM:
    """2-layer Qwen2 CausalLM (4 / 2 heads), init std 0.1 so that a leak would show."""
    torch.manual_seed(0)
    config = {**tiny_config(vocab_size=VOCAB), "initializer_range": 0.1}
    llm = CausalLM(config=config, tokenizer=str(tok_dir), dtype=dtype, attn_backend=backend)
    return llm.to(device)


def packed_inputs(device: str = "cuda") -> tuple[list[dict], dict, dict]:
    """(samples, pack_sequences batch, CausalLM kwargs for the packed rows)."""
    g = torch.Generator().manual_seed(1)
    seqs = []
    for n in PACK_LENGTHS:
        ids = torch.randint(1, VOCAB, (n,), generator=g)
        seqs.append({"input_ids": ids, "labels": ids.clone()})
    batch = pack_sequences(seqs, max_len=PACK_LEN, pad_id=0)
    assert len(batch["bins"]) >= 2  # several rows, several samples per row
    kwargs = {
        "input_ids": batch["input_ids"].to(device),
        "position_ids": batch["position_ids"].to(device),
        "labels": batch["labels"].to(device),
        "use_cache": False,
        **hf_packing_kwargs(batch["cu_seqlens"].to(device), batch["max_seqlen"]),
    }
    return seqs, batch, kwargs


def solo_logits(llm: CausalLM, seqs: list[dict], device: str = "cuda") -> list[torch.Tensor]:
    """Each sample alone through HF's SDPA attention (the packed implementation restored)."""
    impl = llm.model.config._attn_implementation
    llm.model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            return [
                llm(input_ids=s["input_ids"][None].to(device), use_cache=False).logits[0]
                for s in seqs
            ]
    finally:
        llm.model.set_attn_implementation(impl)


def packed_and_solo_grads(
    llm: CausalLM, seqs: list[dict], kwargs: dict, device: str = "cuda"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat parameter gradients of the packed loss and of the token-weighted solo losses."""
    params = [p for p in llm.parameters() if p.requires_grad]

    def flat_grad() -> torch.Tensor:
        return torch.cat(
            [
                torch.zeros_like(p).flatten() if p.grad is None else p.grad.float().flatten()
                for p in params
            ]
        )

    llm.zero_grad(set_to_none=True)
    llm(**kwargs).loss.backward()
    packed = flat_grad()
    impl = llm.model.config._attn_implementation
    llm.model.set_attn_implementation("sdpa")
    llm.zero_grad(set_to_none=True)
    targets = sum(len(s["input_ids"]) - 1 for s in seqs)
    for s in seqs:
        if len(s["input_ids"]) < 2:  # a 1-token sample has no target
            continue
        ids = s["input_ids"][None].to(device)
        loss = llm(input_ids=ids, labels=ids, use_cache=False).loss
        (loss * (len(s["input_ids"]) - 1) / targets).backward()
    llm.model.set_attn_implementation(impl)
    solo = flat_grad()
    llm.zero_grad(set_to_none=True)
    return packed, solo


def train_losses(llm: CausalLM, kwargs: dict, steps: int = 20, lr: float = 1e-2) -> list[float]:
    """AdamW steps on one packed batch; the loss of each step."""
    opt = torch.optim.AdamW(llm.parameters(), lr=lr)
    llm.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = llm(**kwargs).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def xformers_calls(monkeypatch) -> list[tuple[torch.dtype, object]]:
    """(query dtype, attn_bias) of every ``xformers.ops.memory_efficient_attention`` call."""
    calls: list[tuple[torch.dtype, object]] = []
    inner = attention.xops.memory_efficient_attention

    def spy(query, key, value, attn_bias=None, **kwargs):
        calls.append((query.dtype, attn_bias))
        return inner(query, key, value, attn_bias=attn_bias, **kwargs)

    monkeypatch.setattr(attention.xops, "memory_efficient_attention", spy)
    return calls


def assert_block_diagonal_bf16(calls: list, forwards: int, layers: int) -> None:
    assert len(calls) == forwards * layers, f"{len(calls)} xformers calls, not {forwards}x{layers}"
    for dtype, bias in calls:
        assert dtype == torch.bfloat16
        assert isinstance(bias, attention.xbias.BlockDiagonalCausalMask), type(bias)


@needs_xformers
def test_bf16_packed_causal_lm_runs_xformers_and_matches_samples_alone(tmp_path, xformers_calls):
    llm = tiny_llm(write_tokenizer(tmp_path), "bfloat16").eval()
    seqs, batch, kwargs = packed_inputs()
    with torch.no_grad():
        logits = llm(**kwargs).logits
    assert_block_diagonal_bf16(xformers_calls, forwards=1, layers=len(llm.decoder_layers))
    got = split_rows(logits, batch, seqs)
    for i, (packed, alone) in enumerate(zip(got, solo_logits(llm, seqs), strict=True)):
        torch.testing.assert_close(
            packed.float(), alone.float(), atol=5e-2, rtol=5e-2, msg=lambda m, i=i: f"{i}: {m}"
        )


@needs_xformers
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_gradients_match_unpacked(tmp_path, xformers_calls, dtype):
    llm = tiny_llm(write_tokenizer(tmp_path), dtype).train()
    seqs, _, kwargs = packed_inputs()
    packed, solo = packed_and_solo_grads(llm, seqs, kwargs)
    assert len(xformers_calls) == len(llm.decoder_layers)  # the packed forward ran xformers
    assert torch.isfinite(packed).all() and solo.norm() > 0
    if dtype == "float32":
        torch.testing.assert_close(packed, solo, atol=1e-5, rtol=1e-3)
    else:
        rel = ((packed - solo).norm() / solo.norm()).item()
        assert rel < 5e-2, f"bf16 packed vs unpacked gradients: relative error {rel:.3g}"


@pytest.mark.parametrize("backend", ["flex", "sdpa"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_gradients_match_unpacked_per_backend(tmp_path, monkeypatch, backend, dtype):
    calls = []
    inner = attention.flex_packed_attention
    monkeypatch.setattr(attention, "flex_packed_attention", lambda *a: calls.append(1) or inner(*a))
    llm = tiny_llm(write_tokenizer(tmp_path), dtype, backend=backend).train()
    seqs, _, kwargs = packed_inputs()
    packed, solo = packed_and_solo_grads(llm, seqs, kwargs)
    assert len(calls) == (len(llm.decoder_layers) if backend == "flex" else 0)
    assert torch.isfinite(packed).all() and solo.norm() > 0
    rel = ((packed - solo).norm() / solo.norm()).item()
    assert rel < (1e-4 if dtype == "float32" else 5e-2), f"{backend} {dtype}: {rel:.3g}"


@needs_xformers
def test_bf16_packed_training_steps_reduce_loss(tmp_path, xformers_calls):
    llm = tiny_llm(write_tokenizer(tmp_path), "bfloat16")
    _, _, kwargs = packed_inputs()
    losses = train_losses(llm, kwargs, steps=20)
    assert_block_diagonal_bf16(xformers_calls, forwards=20, layers=len(llm.decoder_layers))
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < 0.7 * losses[0], losses
