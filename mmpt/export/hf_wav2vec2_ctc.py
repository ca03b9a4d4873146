"""Export a CTC model (``CTCModule``) as a transformers ``*ForCTC`` folder with its processor.

The folder loads with ``AutoModelForCTC.from_pretrained`` (``Wav2Vec2ForCTC``, ``HubertForCTC``,
``WavLMForCTC``...) and ``Wav2Vec2Processor.from_pretrained``: ``config.json`` (vocabulary
size, ``pad_token_id`` = the blank, the CTC loss settings), ``model.safetensors``, the
feature extractor's ``preprocessor_config.json`` and the tokenizer's ``vocab.json``. Its logits
equal the module's; the quantizer of a tower with a pretraining head is left out.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from mmpt.ctc_vocab import DELIMITER, PAD, UNK


def export_hf_ctc(module: nn.Module, out: str | Path) -> Path:
    """Write ``module`` as an HF CTC model + ``Wav2Vec2Processor`` folder.

    Args:
        module: A :class:`~mmpt.models.ctc.CTCModule` (or a wav2vec-S run).
        out: Output folder (created).

    Returns:
        The folder.

    Raises:
        ValueError: Not a CTC model, or a subword vocabulary (HF's CTC tokenizer spells
            characters).
    """
    from transformers import (
        AutoConfig,
        AutoModelForCTC,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2Processor,
    )

    from mmpt.export.hf_wav2vec2 import torchaudio_to_hf
    from mmpt.models.ctc import CTCModule

    if not isinstance(module, CTCModule):
        raise ValueError(f"the HF CTC export takes a CTC model, not {type(module).__name__}")
    vocab = module.vocab
    if vocab.tokenizer_file:
        raise ValueError("the HF CTC export needs a character vocabulary (not a subword one)")
    tower = module.encoder
    backbone = tower.backbone if tower.source == "hf" else torchaudio_to_hf(tower.model)
    fields = backbone.config.to_dict()
    fields.update(
        vocab_size=len(vocab),
        pad_token_id=vocab.blank,
        ctc_loss_reduction=module.reduction,
        ctc_zero_infinity=module.zero_infinity,
        final_dropout=module.dropout.p,
    )
    model_type = fields.pop("model_type")
    for key in ("architectures", "transformers_version"):
        fields.pop(key, None)
    config = AutoConfig.for_model(model_type, **fields)
    hf = AutoModelForCTC.from_config(config)
    getattr(hf, hf.base_model_prefix).load_state_dict(backbone.state_dict())
    hf.lm_head.load_state_dict(module.lm_head.state_dict())
    out = Path(out)
    hf.save_pretrained(str(out))
    vocab.save(out / "vocab.json")
    tokenizer = Wav2Vec2CTCTokenizer(
        str(out / "vocab.json"),
        unk_token=UNK,
        pad_token=PAD,
        word_delimiter_token=DELIMITER,
        bos_token=None,
        eos_token=None,
        do_lower_case=vocab.lowercase,
    )
    Wav2Vec2Processor(
        feature_extractor=tower.feature_extractor(), tokenizer=tokenizer
    ).save_pretrained(str(out))
    return out


__all__ = ["export_hf_ctc"]
