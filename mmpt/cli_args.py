"""Command-line arguments every ``mmpt`` parser shares: negative numbers, unknown-flag hints."""

from __future__ import annotations

import argparse
import difflib
import re
from typing import Any, NoReturn

# A negative number argparse (before Python 3.13) reads as a flag: -1e-3, -2E5, -.5e1.
_NEGATIVE_EXPONENT = re.compile(r"^-(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)", re.IGNORECASE)


def join_negative_numbers(argv: list[str]) -> list[str]:
    """``["--model.lr", "-1e-3"]`` -> ``["--model.lr=-1e-3"]``.

    argparse takes ``-1e-3`` for an option (its negative-number pattern has no exponent), so the
    flag before it reports "expected one argument". Joining the pair with ``=`` is what a user
    would type to get around it.

    Args:
        argv: Command-line arguments.

    Returns:
        A new list, equal to ``argv`` when it holds no such pair.
    """
    out: list[str] = []
    for arg in argv:
        prev = out[-1] if out else ""
        if _NEGATIVE_EXPONENT.match(arg) and prev.startswith("--") and "=" not in prev:
            out[-1] = f"{prev}={arg}"
        else:
            out.append(arg)
    return out


def unknown_option_hint(message: str, known: list[str]) -> str | None:
    """``unknown option --trainer.max_epoch; did you mean --trainer.max_epochs?``.

    Args:
        message: A parser's error, e.g. ``unrecognized arguments: fit --trainer.max_epoch 3``.
        known: The option strings the parser takes.

    Returns:
        One line per unknown option, or None when ``message`` is not about unknown options.
    """
    found = _UNRECOGNIZED.search(message.splitlines()[0] if message else "")
    if not found:
        return None
    flags = [a.split("=", 1)[0] for a in found.group(1).split() if a.startswith("--")]
    if not flags:
        return None
    lines = []
    for flag in flags:  # an abbreviation first (argparse would have taken it), then a typo
        close = sorted({k for k in known if k.startswith(flag)})[:3]
        close = close or difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
        if close:
            lines.append(f"unknown option {flag}; did you mean {' or '.join(close)}?")
        else:
            lines.append(f"unknown option {flag} (`--help` lists the options)")
    return "\n".join(lines)


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """The options of ``parser`` and of its subcommands' parsers."""
    found = list(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _option_strings(sub)
    return found


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that refuses abbreviated flags and suggests the one meant.

    ``--num-work 4`` would otherwise be read as ``--num-workers 4``, and a typo of a longer
    flag could silently set a shorter one. Subcommand parsers (``add_subparsers``) are of
    this class too.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Like ``argparse.ArgumentParser``, with ``allow_abbrev=False`` by default."""
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Print usage and ``message`` (with a suggestion for an unknown flag); exit 2."""
        super().error(unknown_option_hint(message, _option_strings(self)) or message)
