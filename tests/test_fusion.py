"""Gated cross-attention in a tiny Qwen2: identity at init, gates, masks, grads, generate."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from mmpt.models.fusion import (
    FusionContext,
    GatedCrossAttentionBlock,
    insert_gated_cross_attention,
    text_mask_from_image_tokens,
)

VD, B, T, N = 12, 2, 10, 6


def tiny_llm() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return Qwen2ForCausalLM(config).eval()


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 128, (B, T), generator=torch.Generator().manual_seed(seed))


def open_gates(blocks, value: float = 0.7) -> None:
    with torch.no_grad():
        for block in blocks:
            block.attn_gate.fill_(value)
            block.ff_gate.fill_(value)


@pytest.fixture
def fused():
    llm = tiny_llm()
    with torch.no_grad():
        base = llm(input_ids=ids()).logits
    blocks = insert_gated_cross_attention(llm, vision_dim=VD, every=2)
    return llm, blocks, base


def logits(llm, features=None, blocks=None, **ctx) -> torch.Tensor:
    if features is not None:
        blocks.context.set(features, **ctx)
    with torch.no_grad():
        out = llm(input_ids=ids()).logits
    if blocks is not None:
        blocks.context.clear()
    return out


def test_blocks_go_into_every_kth_layer_and_keep_the_llm_keys(fused):
    llm, blocks, _ = fused
    layers = llm.model.layers
    assert len(blocks) == 2
    assert layers[1].gated_cross_attn is blocks[0] and layers[3].gated_cross_attn is blocks[1]
    assert not hasattr(layers[0], "gated_cross_attn") and not hasattr(layers[2], "gated_cross_attn")
    keys = set(llm.state_dict())
    assert set(tiny_llm().state_dict()) <= keys  # original names untouched
    assert "model.layers.3.gated_cross_attn.attn_gate" in keys
    assert all(b.context is blocks.context for b in blocks)
    assert type(layers[1]).__name__ == "Qwen2DecoderLayer"
    with pytest.raises(ValueError, match="already has"):
        insert_gated_cross_attention(llm, vision_dim=VD, every=2)
    with pytest.raises(ValueError, match="every must be"):
        insert_gated_cross_attention(tiny_llm(), vision_dim=VD, every=5)


def test_llm_is_exactly_unchanged_at_init(fused):
    llm, blocks, base = fused
    assert torch.equal(logits(llm), base)  # no context set: blocks skipped
    assert torch.equal(logits(llm, rand(B, N, VD), blocks), base)
    assert torch.equal(logits(llm, rand(B, N, VD, seed=1) * 100, blocks), base)


def test_open_gates_change_logits_depending_on_the_features(fused):
    llm, blocks, base = fused
    open_gates(blocks)
    out1 = logits(llm, rand(B, N, VD), blocks)
    out1_again = logits(llm, rand(B, N, VD), blocks)
    out2 = logits(llm, rand(B, N, VD, seed=1), blocks)
    assert not torch.allclose(out1, base, atol=1e-4)
    assert not torch.allclose(out1, out2, atol=1e-4)
    assert torch.equal(out1, out1_again)
    assert torch.equal(logits(llm), base)  # context cleared -> text-only LLM again


def test_gradients_reach_gates_at_init_and_the_rest_after_one_step(fused):
    llm, blocks, _ = fused
    llm.requires_grad_(False)
    blocks.requires_grad_(True)
    labels = ids()

    def backward() -> None:
        blocks.zero_grad()
        blocks.context.set(rand(B, N, VD))
        llm(input_ids=ids(), labels=labels).loss.backward()

    backward()
    for block in blocks:
        assert block.attn_gate.grad.abs().item() > 0  # tanh'(0) = 1
        assert block.ff_gate.grad.abs().item() > 0
        # The other weights are connected but scaled by tanh(0) = 0: zero until a gate moves.
        for name, p in block.named_parameters():
            if "gate" not in name:
                assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name
    torch.optim.SGD(blocks.parameters(), lr=0.1).step()
    backward()
    for block in blocks:
        for p in (block.to_q.weight, block.to_kv.weight, block.to_out.weight, block.ff[1].weight):
            assert p.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in llm.named_parameters() if "gated" not in n)


def test_text_mask_keeps_tokens_before_the_first_image_unchanged(fused):
    llm, blocks, base = fused
    open_gates(blocks)
    text_mask = torch.zeros(B, T, dtype=torch.bool)
    text_mask[0, 4:] = True  # sample 0: image marker at position 4; sample 1: no image
    out1 = logits(llm, rand(B, N, VD), blocks, text_mask=text_mask)
    out2 = logits(llm, rand(B, N, VD, seed=1), blocks, text_mask=text_mask)
    assert torch.equal(out1[0, :4], base[0, :4]) and torch.equal(out2[0, :4], base[0, :4])
    assert torch.equal(out1[1], base[1]) and torch.equal(out2[1], base[1])
    assert not torch.allclose(out1[0, 4:], out2[0, 4:], atol=1e-4)


def test_visual_padding_is_ignored_and_an_empty_image_set_is_a_no_op(fused):
    llm, blocks, base = fused
    open_gates(blocks)
    visual_mask = torch.ones(B, N, dtype=torch.bool)
    visual_mask[0, 4:] = False  # sample 0: 4 real visual tokens
    visual_mask[1] = False  # sample 1: none (text-only sample in a mixed batch)
    f1, f2 = rand(B, N, VD), rand(B, N, VD, seed=1)
    f2[0, :4] = f1[0, :4]  # same real tokens, different padding
    out1 = logits(llm, f1, blocks, visual_mask=visual_mask)
    out2 = logits(llm, f2, blocks, visual_mask=visual_mask)
    torch.testing.assert_close(out1[0], out2[0], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out1[0], base[0], atol=1e-4)
    assert torch.equal(out1[1], base[1]) and torch.isfinite(out1).all()


def test_cross_mask_limits_which_visual_tokens_each_token_sees(fused):
    llm, blocks, base = fused
    open_gates(blocks)
    cross = torch.zeros(B, T, N, dtype=torch.bool)
    cross[:, 3:6, :2] = True  # e.g. packed document 1 (tokens 3-5) owns image tokens 0-1
    cross[:, 6:, 2:] = True  # document 2 (tokens 6-9) owns image tokens 2-5
    f1, f2, f3 = rand(B, N, VD), rand(B, N, VD, seed=1), rand(B, N, VD, seed=2)
    f2[:, :2] = f1[:, :2]  # same tokens for document 1
    f3[:, 2:] = f1[:, 2:]  # same tokens for document 2
    out1, out2, out3 = (logits(llm, f, blocks, cross_mask=cross) for f in (f1, f2, f3))
    assert torch.equal(out1[:, :3], base[:, :3])  # tokens that see nothing: unchanged
    torch.testing.assert_close(out1[:, 3:6], out2[:, 3:6], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out1[:, 6:], out2[:, 6:], atol=1e-4)
    assert not torch.allclose(out1[:, 3:6], out3[:, 3:6], atol=1e-4)


@pytest.mark.parametrize("kind", ["text_mask", "cross_mask"])
def test_generate_with_cache_matches_full_forwards(fused, kind):
    llm, blocks, _ = fused
    open_gates(blocks, 0.9)
    text_mask = torch.zeros(B, T, dtype=torch.bool)
    text_mask[0, 2:] = True  # sample 1 has no image: its new tokens see none either
    cross_mask = text_mask[:, :, None] & (torch.arange(N) < 2)  # "latest image only":
    cross_mask[0, 6:] = torch.arange(N) >= 2  # tokens 2-5 see image 1 (0-1), 6+ image 2 (2-5)
    prompt_mask = {"text_mask": text_mask, "cross_mask": cross_mask}[kind]
    features = rand(B, N, VD)
    blocks.context.set(features, **{kind: prompt_mask})
    out = llm.generate(
        ids(),
        max_new_tokens=3,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape == (B, T + 3)
    # Recompute every step without the KV cache, new tokens extending the mask by its rule.
    new = (text_mask.any(1, keepdim=True) if kind == "text_mask" else cross_mask[:, -1:]).expand(
        B, 2, *prompt_mask.shape[2:]
    )
    blocks.context.set(features, **{kind: torch.cat([prompt_mask, new], dim=1)})
    with torch.no_grad():
        full = llm(input_ids=out.sequences[:, :-1], use_cache=False).logits[:, T - 1 :]
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full, atol=1e-4, rtol=1e-4)
    # Beam search / several sequences repeat each sample (repeat_interleave); the context too.
    blocks.context.set(features, **{kind: prompt_mask})
    with torch.no_grad():
        once = llm(input_ids=ids()).logits
        twice = llm(input_ids=ids().repeat_interleave(2, dim=0)).logits
    torch.testing.assert_close(twice, once.repeat_interleave(2, dim=0))
    beams = llm.generate(
        ids(), max_new_tokens=2, num_beams=2, num_return_sequences=2, pad_token_id=0
    )
    assert beams.shape == (2 * B, T + 2)
    blocks.context.clear()


def test_gradient_checkpointing_gives_the_same_gradients(fused):
    llm, blocks, _ = fused
    open_gates(blocks, 0.5)
    llm.train()

    def grads() -> list[torch.Tensor]:
        llm.zero_grad()
        blocks.context.set(rand(B, N, VD))
        llm(input_ids=ids(), labels=ids(), use_cache=False).loss.backward()
        return [p.grad.clone() for p in blocks.parameters()]

    plain = grads()
    llm.activation_checkpointing_enable()
    assert llm.model.layers[1].gradient_checkpointing
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)


def test_blocks_follow_the_llm_dtype_and_take_float32_features():
    llm = tiny_llm().to(torch.bfloat16)
    base = logits(llm)
    blocks = insert_gated_cross_attention(llm, vision_dim=VD, every=2)
    assert {p.dtype for p in blocks.parameters()} == {torch.bfloat16}
    assert torch.equal(logits(llm, rand(B, N, VD), blocks), base)
    open_gates(blocks)
    out = logits(llm, rand(B, N, VD), blocks)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert not torch.equal(out, base)


def test_block_alone_identity_at_init_and_hidden_states_by_keyword():
    block = GatedCrossAttentionBlock(dim=16, vision_dim=VD, heads=4)
    x, f = rand(B, T, 16), rand(B, N, VD)
    assert torch.equal(block(x, f), x)
    open_gates([block])
    assert not torch.allclose(block(x, f), x)
    no_image = block(x, f, visual_mask=torch.zeros(B, N, dtype=torch.bool))
    assert torch.equal(no_image, x)
    with pytest.raises(ValueError, match="heads"):
        GatedCrossAttentionBlock(dim=18, vision_dim=VD, heads=4)

    class Layer(nn.Module):  # a decoder layer that takes hidden_states by keyword only
        def forward(self, *, hidden_states: torch.Tensor) -> torch.Tensor:
            return hidden_states

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Layer()])
            self.config = Qwen2Config(hidden_size=16, num_attention_heads=4)

    model = Model()
    blocks = insert_gated_cross_attention(model, vision_dim=VD, every=1)  # type: ignore[arg-type]
    blocks[0].load_state_dict(block.state_dict())
    blocks.context.set(f)
    torch.testing.assert_close(model.layers[0](hidden_states=x), block(x, f))


def test_context_checks_and_text_mask_helper():
    ctx = FusionContext()
    with pytest.raises(RuntimeError, match="set"):
        ctx.inputs_for(B, T)
    with pytest.raises(ValueError, match="visual_mask"):
        ctx.set(rand(B, N, VD), visual_mask=torch.ones(B, N + 1))
    ctx.set(rand(B, N, VD), visual_mask=torch.ones(B, N), text_mask=torch.ones(B, T))
    assert ctx.visual_mask.dtype == torch.bool
    with pytest.raises(ValueError, match="masks cover"):
        ctx.inputs_for(B, T + 1)
    with pytest.raises(ValueError, match="cross_mask"):
        ctx.set(rand(B, N, VD), text_mask=torch.ones(B, T), cross_mask=torch.ones(B, T + 1, N))
    with pytest.raises(ValueError, match="multiple"):
        ctx.inputs_for(3, T)
    ctx.set(rand(B, N, VD), visual_mask=torch.ones(B, N), text_mask=torch.ones(B, T))
    features, (visual_mask, text_mask, cross_mask) = ctx.inputs_for(2 * B, 1)
    assert features.shape == (2 * B, N, VD) and text_mask.shape == (2 * B, 1)
    assert visual_mask.shape == (2 * B, N) and cross_mask is None
    input_ids = torch.tensor([[5, 7, 99, 3, 99, 4], [5, 6, 7, 8, 9, 1]])
    expected = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(text_mask_from_image_tokens(input_ids, 99), expected)
