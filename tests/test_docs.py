"""Docs: every ``mmpt`` command in the Markdown and the recipes parses; the site builds.

Commands are taken from fenced code blocks of README.md and docs/**/*.md (bash, console, text,
untagged) and from the header comments of configs/**/*.yaml. Each must name an existing
command and subcommand, and every flag must exist in that command's parser; ``fit``,
``validate``, ``test`` and ``predict`` with a config file from the repository run
``--print_config`` with their overrides, so a renamed key or flag breaks the build.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mmpt.cli import LIGHTNING_COMMANDS, TOP_HELP, command_parser, training_parser
from tests.test_configs import overlay_base

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from docs_site import recipe_commands, recipe_files  # noqa: E402

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.S | re.M)
SKIP_LANGS = {"yaml", "python", "json", "toml", "ini", "csv"}


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def block_commands(text: str) -> list[str]:
    """``mmpt ...`` commands of the fenced code blocks of ``text``, continuations joined."""
    commands = []
    for lang, body in FENCE.findall(text):
        if lang in SKIP_LANGS:
            continue
        current = None
        for raw in body.splitlines():
            line = raw.strip().removeprefix("$ ")
            if current is not None:
                current += " " + line.rstrip("\\").strip()
                if not line.endswith("\\"):
                    commands.append(current)
                    current = None
                continue
            line = re.sub(r"^(\w+=\S+\s+)+", "", line)  # MMPT_DEBUG=1 mmpt ...
            if line.startswith("mmpt "):
                if line.endswith("\\"):
                    current = line.rstrip("\\").strip()
                else:
                    commands.append(line)
    return commands


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every documented ``mmpt`` command."""
    found = []
    for path in markdown_files():
        for command in block_commands(path.read_text()):
            found.append((str(path.relative_to(ROOT)), command))
    for path in recipe_files():
        for command in recipe_commands(path.read_text()):
            found.append((str(path.relative_to(ROOT)), command))
    return found


def tokens(command: str) -> list[str]:
    """shlex tokens of one command, cut at a pipe, ``&&`` or ``;``; comments dropped."""
    out = []
    for tok in shlex.split(command, comments=True):
        if tok in ("|", "&&", ";", ">", "2>&1"):
            break
        if tok != "...":  # "more flags", elided
            out.append(tok)
    return out


def subparsers(parser) -> dict:
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return action.choices
    return {}


def check_argparse_command(argv: list[str]) -> None:
    """Subcommand and every flag of ``argv`` (after ``mmpt``) exist."""
    command, rest = argv[0], argv[1:]
    parser = command_parser(command)
    subs = subparsers(parser)
    if subs:
        assert rest and rest[0] in subs, f"`mmpt {command} {rest[:1]}`: unknown subcommand"
        parser, rest = subs[rest[0]], rest[1:]
    known = parser._option_string_actions
    for tok in rest:
        if tok.startswith("-") and not re.fullmatch(r"-\d.*", tok):
            flag = tok.split("=", 1)[0]
            assert flag in known, f"`{flag}` is not a flag of `mmpt {command}`"


def placeholder(path: str) -> bool:
    return not (ROOT / path).is_file()


@functools.cache
def parser():
    return training_parser()


def print_config(argv: list[str]) -> None:
    """``mmpt <fit|...> ... --print_config`` parses (exit code 0), on one shared parser."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        parser().parse_args([*argv, "--print_config"])
    assert e.value.code in (0, None), out.getvalue()[-2000:]


def unique(commands: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The first place of each distinct command (the same argv is checked once)."""
    seen, out = set(), []
    for where, command in commands:
        key = tuple(tokens(command))
        if key not in seen:
            seen.add(key)
            out.append((where, command))
    return out


ALL_COMMANDS = documented_commands()
COMMANDS = unique(ALL_COMMANDS)


def test_commands_were_found() -> None:
    """The extraction itself works: the README's and the tutorials' commands are there."""
    where = {w for w, _ in ALL_COMMANDS}
    assert "README.md" in where and "docs/tutorials/vlm.md" in where
    assert len(COMMANDS) > 50


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[f"{w}:{c[:60]}" for w, c in COMMANDS])
def test_documented_command_parses(where: str, command: str, monkeypatch) -> None:
    argv = tokens(command)[1:]
    assert argv, f"{where}: `{command}` has no command"
    if argv[0] in ("-h", "--help"):
        return
    if argv[0] not in LIGHTNING_COMMANDS:
        check_argparse_command(argv)
        return
    configs = [argv[i + 1] for i, t in enumerate(argv[:-1]) if t in ("-c", "--config")]
    if not configs or any(placeholder(c) for c in configs):
        return  # a placeholder (CONFIG, base.yaml): only the command name can be checked
    plain = argv[0] == "fit" and len(argv) == 3 and configs[0].startswith("configs/")
    if plain and overlay_base(ROOT / configs[0]) is None:
        return  # one recipe as written: test_configs.py parses each (--print_config)
    monkeypatch.chdir(ROOT)
    print_config(argv)


def test_top_help_lists_every_command() -> None:
    """`mmpt --help` names every command and every data/eval subcommand."""
    from mmpt.cli import COMMAND_PARSERS

    for command in [*LIGHTNING_COMMANDS, *COMMAND_PARSERS]:
        assert re.search(rf"^  {command}\b", TOP_HELP, re.M), command
    for command in COMMAND_PARSERS:
        for sub in subparsers(command_parser(command)):
            assert f"{command} {sub}" in TOP_HELP, f"mmpt --help lacks `{command} {sub}`"


def test_a_renamed_flag_fails(tmp_path: Path) -> None:
    """The check is real: a flag that does not exist is caught, for argparse and LightningCLI."""
    with pytest.raises(AssertionError, match="--no-such-flag"):
        check_argparse_command(["eval", "retrieval", "--no-such-flag", "1"])
    with pytest.raises(AssertionError, match="unknown subcommand"):
        check_argparse_command(["data", "synthesize"])
    with pytest.raises((SystemExit, Exception)):
        print_config(
            ["-c", str(ROOT / "configs/quickstart/clip_tiny.yaml"), "--trainer.max_epoch", "3"]
        )


def test_mkdocs_strict_build(tmp_path: Path) -> None:
    """The site builds with --strict: no broken link, anchor or API reference."""
    mkdocs = pytest.importorskip("mkdocs")
    del mkdocs
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").is_file()
    api = tmp_path / "site" / "reference" / "api" / "mmpt.models.contrastive" / "index.html"
    assert "ContrastiveModule" in api.read_text()
    recipe = tmp_path / "site" / "reference" / "recipes" / "quickstart__clip_tiny" / "index.html"
    assert "Tiny CLIP on synthetic shapes" in recipe.read_text()


def test_sphinx_roles_become_code_spans() -> None:
    from docs_griffe import rewrite_roles

    text = "See :class:`~mmpt.models.module.MMPTModule`, :func:`mmpt.load` and ``x``."
    assert rewrite_roles(text) == "See `MMPTModule`, `mmpt.load` and ``x``."
