"""A small randomly initialised BERT + word-level tokenizer, saved for offline recipes and tests."""

from __future__ import annotations

from pathlib import Path

#: The special tokens, in id order (pad 0, unk 1, cls 2, sep 3, mask 4).
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def write_bert(
    path: str | Path,
    words: list[str],
    hidden_size: int = 24,
    layers: int = 3,
    heads: int = 2,
    max_positions: int = 16,
    seed: int = 0,
) -> Path:
    """Save a BERT (no dropout) and a WordLevel tokenizer (``[CLS] text [SEP]``, ``[MASK]``).

    ``AutoModel`` / ``AutoTokenizer.from_pretrained(path)`` load them (a fast tokenizer: it
    gives character offsets).

    Args:
        path: Folder to write.
        words: Vocabulary; must start with :data:`BERT_SPECIALS` (ids 0-4).
        hidden_size: Width.
        layers: Encoder layers.
        heads: Attention heads.
        max_positions: Position embeddings (longest token row).
        seed: Seed of the random weights.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: When ``words`` does not start with the special tokens.

    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    if tuple(words[: len(BERT_SPECIALS)]) != BERT_SPECIALS:
        raise ValueError(f"words must start with {BERT_SPECIALS}")
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    names = ("pad", "unk", "cls", "sep", "mask")
    specials = {f"{n}_token": f"[{n.upper()}]" for n in names}
    PreTrainedTokenizerFast(tokenizer_object=raw, **specials).save_pretrained(str(path))
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(words),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=max_positions,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    BertModel(cfg).save_pretrained(str(path))
    return Path(path)
