"""COCO caption tokenisation: pycocoevalcap's PTBTokenizer (Java), or a Python port of it.

The COCO caption toolkit lowercases and PTB-tokenises every caption with Stanford CoreNLP
3.4.1's ``PTBTokenizer -preserveLines -lowerCase`` and then drops the tokens in
``pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS``. :func:`ptb_tokenize` runs that very
jar (shipped inside pycocoevalcap) when ``java`` is on the PATH, and otherwise
:func:`ptb_tokenize_python`, a port of the rules that matter for captions:

- lowercase; unicode quotes to ASCII (``“`` -> ``````, ``”`` -> ``''``, ``’`` -> ``'``);
- opening ``"`` -> ``````, closing ``"`` -> ``''``, a leading ``'`` -> ```` ` ````;
- brackets -> ``-lrb- -rrb- -lsb- -rsb- -lcb- -rcb-`` (lowercased, so, as in the toolkit,
  they are *not* in the punctuation list and stay);
- clitics split off: ``n't 's 'm 'd 'll 're 've``; ``cannot`` -> ``can not``, ``gonna`` ->
  ``gon na``, ``'tis`` -> ``'t is``;
- leading ``$ #`` and trailing ``. , ; : ? ! % ' "`` and brackets split off; ``...`` and
  ``--`` are tokens; runs of ``?``/``!`` stay one token (``?!``, which the toolkit keeps);
- ``1,000``, ``3.5``, ``12:30``, ``t-shirt``, ``hello.world``, acronyms (``u.s.``, ``a.``)
  and common abbreviations (``dr.``, ``co.``) stay one token.

Known differences from the Java lexer (rare in captions): the rest of its abbreviation list,
``rock'n'roll``-style inner clitics, URLs and emoticons, SGML, fractions and currency
normalisation. The parity test runs both on tricky captions when Java is present.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType


def require_pycocoevalcap(module: str = "pycocoevalcap") -> ModuleType:
    """Import a pycocoevalcap module, or say how to install it.

    Args:
        module: Dotted module name inside pycocoevalcap.

    Raises:
        ImportError: pycocoevalcap is not installed (``pip install 'mmpt[eval]'``).
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise ImportError(
            "caption metrics need the COCO caption toolkit: pip install 'mmpt[eval]' "
            f"(pycocoevalcap>=1.2); importing {module} failed: {e}"
        ) from e


_coco_ptb = require_pycocoevalcap("pycocoevalcap.tokenizer.ptbtokenizer")

PUNCTUATIONS: frozenset[str] = frozenset(_coco_ptb.PUNCTUATIONS)
"""The tokens pycocoevalcap removes after tokenisation (its own list, imported)."""

_UNICODE = str.maketrans({"“": '"', "”": '"', "‘": "'", "’": "'", "\u00a0": " "})
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT_WORDS = {
    "cannot": ["can", "not"],
    "gonna": ["gon", "na"],
    "gotta": ["got", "ta"],
    "wanna": ["wan", "na"],
    "gimme": ["gim", "me"],
    "lemme": ["lem", "me"],
    "'tis": ["'t", "is"],
    "'twas": ["'t", "was"],
}
_ACRONYM = re.compile(r"^(?:[a-z]\.)+$")
_ABBREVIATIONS = frozenset(
    [
        "mr.",
        "mrs.",
        "ms.",
        "dr.",
        "st.",
        "jr.",
        "sr.",
        "co.",
        "inc.",
        "ltd.",
        "corp.",
        "vs.",
        "mt.",
        "prof.",
        "gen.",
        "gov.",
        "sen.",
        "rep.",
        "ft.",
    ]
)
_CLITIC = re.compile(r"^(.+?)(n't|'s|'m|'d|'ll|'re|'ve)$")
_BARE_CLITIC = re.compile(r"^'(?:s|m|d|ll|re|ve)(?![a-z])")
_TRAILING = re.compile(r"(\.\.\.|--|[?!]+|[.,;:%'\")\]}])$")
_LEADING = re.compile(r"^(--|[$#`'\"(\[{])")
_INNER_DASH = re.compile(r"(--)")
_INNER_COMMA = re.compile(r"(?<!\d),|,(?!\d)")


def _split_chunk(chunk: str) -> list[str]:
    """PTB-tokenise one whitespace-free, lowercased chunk (before quote/bracket mapping)."""
    if chunk in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[chunk])
    if chunk == "..." or chunk == "--" or re.fullmatch(r"[?!]+", chunk):
        return [chunk]
    head: list[str] = []
    tail: list[str] = []
    while chunk:
        if chunk in _SPLIT_WORDS:
            head.extend(_SPLIT_WORDS[chunk])
            chunk = ""
            break
        lead = _LEADING.match(chunk)
        if lead and len(chunk) > 1 and not _BARE_CLITIC.match(chunk):
            head.append("``" if lead.group(1) == '"' else lead.group(1).replace("'", "`"))
            chunk = chunk[len(lead.group(1)) :]
            continue
        trail = _TRAILING.search(chunk)
        keep_period = _ACRONYM.match(chunk) or chunk in _ABBREVIATIONS
        if trail and not (trail.group(1) == "." and keep_period and len(chunk) > 1):
            if len(chunk) == len(trail.group(1)):
                break
            tail.insert(0, trail.group(1))
            chunk = chunk[: -len(trail.group(1))]
            continue
        break
    middle: list[str] = []
    if chunk:
        clitic = _CLITIC.match(chunk)
        while clitic and clitic.group(1) not in ("'", "n"):
            middle.insert(0, clitic.group(2))
            chunk = clitic.group(1)
            clitic = _CLITIC.match(chunk)
        middle.insert(0, chunk)
    tokens: list[str] = []
    for piece in head + middle + tail:
        for part in _INNER_DASH.split(piece) if "--" in piece and piece != "--" else [piece]:
            if not part:
                continue
            subs = _INNER_COMMA.split(part) if "," in part and part != "," else [part]
            for i, sub in enumerate(subs):
                if i:
                    tokens.append(",")
                if sub:
                    tokens.append(sub)
    return tokens


def _map_token(token: str, opening: bool) -> str:
    if token == '"':
        return "``" if opening else "''"
    return _BRACKETS.get(token, token)


def ptb_tokenize_line(text: str) -> list[str]:
    """PTB-tokenise one caption the way CoreNLP 3.4.1 does with ``-lowerCase`` (Python port).

    Args:
        text: one caption.

    Returns:
        The tokens, lowercased, punctuation *not* yet removed.
    """
    out: list[str] = []
    for chunk in text.translate(_UNICODE).lower().split():
        pieces = _split_chunk(chunk)
        for i, piece in enumerate(pieces):
            out.append(_map_token(piece, opening=i == 0 and piece == '"' and len(pieces) > 1))
    return out


def _strip_punct(tokens: Sequence[str]) -> str:
    return " ".join(t for t in tokens if t not in PUNCTUATIONS)


def ptb_tokenize_python(captions: Sequence[str]) -> list[str]:
    """Tokenise captions with the Python port, then drop pycocoevalcap's punctuation tokens.

    Args:
        captions: N captions.

    Returns:
        N space-joined token strings (``""`` for an empty caption).
    """
    return [_strip_punct(ptb_tokenize_line(c)) for c in captions]


def java_available() -> bool:
    """Whether ``java`` is on the PATH (the COCO toolkit's tokenizer and METEOR need it)."""
    return shutil.which("java") is not None


def ptb_tokenize_java(captions: Sequence[str]) -> list[str]:
    """Tokenise captions with pycocoevalcap's own CoreNLP jar and flags, in one Java call.

    Same command as ``pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer`` (``-preserveLines
    -lowerCase``, then its punctuation list), but the temporary file goes to the system temp
    folder (pycocoevalcap writes it next to the jar, which fails in a read-only install) and
    blank captions map to ``""`` without reaching Java.

    Args:
        captions: N captions.

    Returns:
        N space-joined token strings.

    Raises:
        FileNotFoundError: ``java`` is not on the PATH.
        RuntimeError: the tokenizer failed or returned the wrong number of lines.
    """
    java = shutil.which("java")
    if java is None:
        raise FileNotFoundError("java is not on the PATH: use ptb_tokenize_python instead")
    lines = [" ".join(c.split()) for c in captions]
    keep = [i for i, line in enumerate(lines) if line]
    out = [""] * len(lines)
    if not keep:
        return out
    jar = Path(_coco_ptb.__file__).with_name(_coco_ptb.STANFORD_CORENLP_3_4_1_JAR)
    fd, name = tempfile.mkstemp(suffix=".txt", prefix="mmpt_ptb_")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines[i] for i in keep))
        cmd = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer"]
        cmd += ["-preserveLines", "-lowerCase", name]
        proc = subprocess.run(cmd, capture_output=True, check=False)
    finally:
        os.unlink(name)
    got = proc.stdout.decode("utf-8").split("\n")
    if proc.returncode != 0 or len(got) < len(keep):
        raise RuntimeError(
            f"CoreNLP PTBTokenizer failed (exit {proc.returncode}, {len(got)} lines for "
            f"{len(keep)} captions): {proc.stderr.decode('utf-8', 'replace')[-500:]}"
        )
    for i, line in zip(keep, got, strict=False):
        out[i] = _strip_punct(line.rstrip().split(" "))
    return out


def ptb_tokenize(captions: Sequence[str], backend: str = "auto") -> list[str]:
    """Tokenise captions as the COCO caption toolkit does.

    Args:
        captions: N captions.
        backend: ``"java"`` (pycocoevalcap's CoreNLP jar), ``"python"`` (the port) or
            ``"auto"`` (Java when ``java`` is on the PATH, else the port).

    Returns:
        N space-joined token strings, punctuation removed.
    """
    if backend not in ("auto", "java", "python"):
        raise ValueError(f"tokenizer backend must be auto, java or python, got {backend!r}")
    if backend == "java" or (backend == "auto" and java_available()):
        return ptb_tokenize_java(captions)
    return ptb_tokenize_python(captions)
