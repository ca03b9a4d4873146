"""The prompt YAML of ``mmpt data score --kind vlm``: a scoring mode and its prompts, checked.

Two modes (``configs/curation/mlm_filter.yaml`` and ``caption_likelihood.yaml`` are examples):

- ``judgement`` (MLM-Filter): for each metric the model reads the image and a prompt holding
  the caption and asks for a score; the column is the expected score under its next-token
  distribution over the score tokens (``scores: {from: 0, to: 9}``: "0" ... "9", each one
  token of the model's tokenizer), optionally mapped linearly onto ``rescale: [lo, hi]``.
- ``caption_likelihood``: the mean log-probability of the caption's tokens (and its
  end-of-turn) as the assistant's reply to ``prompt`` about the image; with ``pmi: true``
  also that minus the same without the image (how much the image explains the caption).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpt.io import read_yaml

MODES = ("judgement", "caption_likelihood")
_KEYS = {
    "judgement": {"mode", "scores", "rescale", "template", "metrics"},
    "caption_likelihood": {"mode", "prompt", "pmi"},
}
_FIELDS = {"caption", "criteria", "aspect", "low", "high"}


@dataclass
class ScorePrompt:
    """A checked prompt YAML.

    Attributes:
        mode: ``judgement`` or ``caption_likelihood``.
        prompts: judgement: metric name -> user prompt with a ``{caption}`` field (the
            template, criteria and scale already filled in).
        scores: judgement: the score strings, lowest first (each must be one token).
        rescale: judgement: (lo, hi) the expected score is mapped onto, or None.
        prompt: caption_likelihood: the user turn before the caption (may be empty).
        pmi: caption_likelihood: also score the caption without the image.
    """

    mode: str
    prompts: dict[str, str] = field(default_factory=dict)
    scores: list[str] = field(default_factory=list)
    rescale: tuple[float, float] | None = None
    prompt: str = ""
    pmi: bool = False

    def columns(self, name: str) -> list[str]:
        """Score column names under the prefix ``name`` (``mlm`` -> ``mlm_itm`` ...)."""
        metrics = list(self.prompts) if self.mode == "judgement" else ["ll"]
        return [f"{name}_{m}" for m in metrics + (["pmi"] if self.pmi else [])]

    def values(self) -> list[float]:
        """The number each score string stands for, after ``rescale``."""
        raw = [float(s) for s in self.scores]
        if self.rescale is None:
            return raw
        lo, hi = self.rescale
        return [lo + (v - raw[0]) / (raw[-1] - raw[0]) * (hi - lo) for v in raw]

    def score_token_ids(self, tokenizer: Any) -> list[int]:
        """The token id of every score string.

        Raises:
            ValueError: A score is not exactly one token, or two share one.
        """
        ids = []
        for s in self.scores:
            toks = tokenizer(s, add_special_tokens=False)["input_ids"]
            unk = getattr(tokenizer, "unk_token_id", None)
            if len(toks) != 1 or toks[0] == unk:
                raise ValueError(
                    f"--prompt scores: {s!r} is {len(toks)} token(s) {toks} for this model's "
                    "tokenizer, not one; use a scale whose every score is one token, e.g. "
                    "scores: {from: 0, to: 9} (tokenizers that split numbers into digits)"
                )
            ids.append(toks[0])
        if len(set(ids)) != len(ids):
            raise ValueError(f"--prompt scores: two scores share a token: {ids}")
        return ids


def _fail(path: Path, message: str) -> ValueError:
    return ValueError(f"--prompt {path}: {message}")


def _scores(path: Path, spec: Any) -> list[str]:
    if isinstance(spec, dict) and set(spec) == {"from", "to"}:
        lo, hi = spec["from"], spec["to"]
        if isinstance(lo, int) and isinstance(hi, int) and lo < hi:
            return [str(v) for v in range(lo, hi + 1)]
    elif isinstance(spec, list) and len(spec) > 1:
        try:
            values = [float(s) for s in spec]
        except (TypeError, ValueError):
            values = []
        if values and values == sorted(set(values)):
            return [str(s) for s in spec]
    raise _fail(path, f"scores: {spec!r}; write {{from: 0, to: 9}} or a rising list of numbers")


def _fill(path: Path, where: str, text: str, values: dict[str, str]) -> str:
    """``text`` with every field but ``{caption}`` filled; unknown fields are errors."""
    if not isinstance(text, str) or not text.strip():
        raise _fail(path, f"{where}: a non-empty string is needed")
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as e:
        raise _fail(path, f"{where}: {e} (write a literal brace as {{{{ or }}}})") from e
    if unknown := names - _FIELDS:
        raise _fail(path, f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(_FIELDS)}")
    return text.format(**values, caption="{caption}")


def _judgement(path: Path, raw: dict[str, Any]) -> ScorePrompt:
    scores = _scores(path, raw.get("scores"))
    rescale = raw.get("rescale")
    if rescale is not None:
        ok = isinstance(rescale, list) and len(rescale) == 2
        if not ok or not all(isinstance(v, int | float) for v in rescale):
            raise _fail(path, f"rescale: {rescale!r}; write [lo, hi], e.g. [0, 100]")
        rescale = (float(rescale[0]), float(rescale[1]))
    metrics = raw.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        raise _fail(path, "metrics: a mapping of metric name -> criteria (or {criteria, aspect})")
    template = raw.get("template", "{criteria}")
    prompts = {}
    for name, spec in metrics.items():
        if not str(name).isidentifier():
            raise _fail(path, f"metrics: {name!r} is not a name (it becomes a score column)")
        spec = {"criteria": spec} if isinstance(spec, str) else spec
        if not isinstance(spec, dict) or set(spec) - {"criteria", "aspect"}:
            raise _fail(path, f"metrics.{name}: give criteria (and maybe aspect), got {spec!r}")
        values = {"low": scores[0], "high": scores[-1], "aspect": str(spec.get("aspect", name))}
        values["criteria"] = _fill(path, f"metrics.{name}.criteria", spec.get("criteria"), values)
        prompt = _fill(path, "template", template, values)
        if "{caption}" not in prompt:
            raise _fail(path, f"metrics.{name}: neither template nor criteria has {{caption}}")
        prompts[str(name)] = prompt
    return ScorePrompt("judgement", prompts=prompts, scores=scores, rescale=rescale)


def load_prompt(path: str | Path) -> ScorePrompt:
    """Read and check a prompt YAML.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not YAML, an unknown mode or key (a typo), a missing or malformed field.
    """
    path = Path(path)
    raw = read_yaml(path, "--prompt")
    if not isinstance(raw, dict):
        raise _fail(path, "expected a mapping with mode: judgement or caption_likelihood")
    mode = raw.get("mode")
    if mode not in MODES:
        raise _fail(path, f"mode: {mode!r}; expected one of {list(MODES)}")
    if unknown := set(raw) - _KEYS[mode]:
        raise _fail(path, f"unknown key(s) {sorted(unknown)} for mode {mode}; known: "
                    f"{sorted(_KEYS[mode])}")  # fmt: skip
    if mode == "judgement":
        return _judgement(path, raw)
    prompt, pmi = raw.get("prompt", ""), raw.get("pmi", False)
    if not isinstance(prompt, str) or not isinstance(pmi, bool):
        raise _fail(path, "prompt must be a string and pmi true or false")
    return ScorePrompt("caption_likelihood", prompt=prompt, pmi=pmi)
