"""CTC beam search with an n-gram language model (torchaudio's flashlight decoder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmpt.ctc_vocab import DELIMITER, PAD, UNK, CTCVocab


def beam_search_available() -> bool:
    """Whether torchaudio's CTC decoder can be built (it needs the flashlight-text package)."""
    try:
        from torchaudio.models.decoder import ctc_decoder  # noqa: F401
    except (ImportError, RuntimeError):
        return False
    return True


def require_beam_search() -> None:
    """Fail clearly where torchaudio's CTC decoder cannot be built.

    Raises:
        ValueError: flashlight-text is missing (names the flag, the package and the command).
    """
    if not beam_search_available():
        raise ValueError(
            "--beam-size: beam search needs torchaudio's CTC decoder, which needs the "
            "flashlight-text package: pip install flashlight-text (and kenlm for --lm), "
            "or leave --beam-size out for greedy decoding"
        )


class BeamSearchDecoder:
    """Lexicon-free or lexicon beam search over a character vocabulary, KenLM n-gram LM.

    Args:
        vocab: The CTC vocabulary (``<pad>`` is the blank, ``|`` the word boundary).
        lm: A KenLM ``.arpa``/``.bin`` file, or None for no language model.
        lexicon: A lexicon file (word, then its spelling, tokens space-separated), or None
            for lexicon-free decoding.
        beam_size: Hypotheses kept per step.
        lm_weight: Weight of the LM score.
        word_score: Score added per word.

    Raises:
        ValueError: torchaudio's decoder is not installed (names the package), or a
            subword vocabulary (the decoder here spells characters).
        FileNotFoundError: ``lm`` or ``lexicon`` is not a file.
    """

    def __init__(
        self,
        vocab: CTCVocab,
        lm: str | None = None,
        lexicon: str | None = None,
        beam_size: int = 50,
        lm_weight: float = 2.0,
        word_score: float = 0.0,
    ) -> None:
        require_beam_search()
        for flag, path in (("--lm", lm), ("--lexicon", lexicon)):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{flag} {path}: no such file")
        if vocab.tokenizer_file:
            raise ValueError("--beam-size: beam search here takes a character vocabulary")
        from torchaudio.models.decoder import ctc_decoder

        self.vocab = vocab
        self._decoder: Any = ctc_decoder(
            lexicon=lexicon,
            tokens=list(vocab.tokens),
            lm=lm,
            beam_size=beam_size,
            lm_weight=lm_weight,
            word_score=word_score,
            blank_token=PAD,
            sil_token=DELIMITER,
            unk_word=UNK,
        )

    def __call__(self, logits: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        """Best transcript of each row of ``logits`` (B, T, V) over its ``lengths`` frames."""
        emissions = torch.log_softmax(logits.float(), dim=-1).cpu().contiguous()
        hyps = self._decoder(emissions, lengths.cpu().to(torch.int32))
        return [self.vocab.decode(h[0].tokens.tolist()) if h else "" for h in hyps]


__all__ = ["BeamSearchDecoder", "beam_search_available", "require_beam_search"]
