"""MkDocs hooks for the documentation site: recipe and API reference pages generated at build.

``mkdocs.yml`` names this file under ``hooks:``. At build time it

- links ``mmpt/``, ``models/`` and ``datamodules/`` into one ``mmpt`` package tree under
  ``.cache/docs_src`` (the installed layout, which griffe cannot see through the editable
  install's package-dir mapping), for mkdocstrings to read;
- writes one page per recipe in ``configs/`` (its header comment, where its numbers come from,
  its key settings and the whole file), so the docs never drift from the YAML;
- writes one API page per module of ``mmpt``, ``mmpt.models`` and ``mmpt.datamodules``
  (``::: module``, rendered by mkdocstrings from the docstrings);
- adds both sections to the navigation.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / ".cache" / "docs_src"
#: package name -> folder of the repository holding it
PACKAGES = {
    "mmpt": ROOT / "mmpt",
    "mmpt.models": ROOT / "models",
    "mmpt.datamodules": ROOT / "datamodules",
}
#: settings worth a row on a recipe page (dotted paths; missing ones are left out)
KEY_SETTINGS = (
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.precision",
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.accumulate_grad_batches",
    "trainer.gradient_clip_val",
    "model.class_path",
    "model.init_args.optimizer.class_path",
    "model.init_args.optimizer.init_args.lr",
    "model.init_args.optimizer.init_args.weight_decay",
    "model.init_args.lr_schedule.class_path",
    "model.init_args.lr_schedule.init_args.warmup_steps",
    "model.init_args.loss.class_path",
    "data.class_path",
    "data.init_args.batch_size",
    "data.init_args.train.urls",
    "data.init_args.val.urls",
)


def link_sources(root: Path = SOURCE) -> Path:
    """Make ``root/mmpt`` a package tree of symlinks: mmpt's files + ``models``, ``datamodules``."""
    pkg = root / "mmpt"
    pkg.mkdir(parents=True, exist_ok=True)
    for item in (ROOT / "mmpt").iterdir():
        if item.name == "__init__.py":  # a copy: griffe finds submodules beside the real file
            if (pkg / item.name).is_symlink():
                (pkg / item.name).unlink()
            (pkg / item.name).write_text(item.read_text())
        elif item.name != "__pycache__":
            _symlink(pkg / item.name, item)
    _symlink(pkg / "models", ROOT / "models")
    _symlink(pkg / "datamodules", ROOT / "datamodules")
    return root


def _symlink(link: Path, target: Path) -> None:
    if link.is_symlink() and link.resolve() == target.resolve():
        return
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


def modules() -> list[str]:
    """Dotted names of every public module of the three packages, sorted."""
    names = []
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if any(p.startswith("_") for p in parts) or "__pycache__" in rel.parts:
                continue
            names.append(".".join([package, *parts]))
    return sorted(set(names))


def api_pages() -> dict[str, str]:
    """``reference/api/<module>.md`` -> Markdown, plus the index page."""
    pages = {}
    rows = []
    for name in modules():
        pages[f"reference/api/{name}.md"] = f"# `{name}`\n\n::: {name}\n"
        rows.append(f"- [`{name}`]({name}.md)")
    intro = (
        "# API reference\n\nGenerated from the docstrings of every public module "
        "(Google style, tensor shapes in the argument descriptions).\n\n"
    )
    pages["reference/api/index.md"] = intro + "\n".join(rows) + "\n"
    return pages


def header_comment(text: str) -> str:
    """The YAML's leading comment block, ``#`` stripped (command lines kept verbatim)."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].removeprefix(" "))
    return "\n".join(lines)


def recipe_commands(text: str) -> list[str]:
    """``mmpt ...`` commands in a recipe's header comment, continuation lines joined.

    Commands are the indented lines (``#   mmpt fit ...``); prose lines are not.
    """
    commands, current = [], None
    for line in header_comment(text).splitlines():
        stripped = line.strip()
        if current is not None:
            current += " " + stripped.rstrip("\\").strip()
            if not stripped.endswith("\\"):
                commands.append(current)
                current = None
        elif stripped.startswith("mmpt ") and line.startswith("  "):  # indented: a command
            if stripped.endswith("\\"):
                current = stripped.rstrip("\\").strip()
            else:
                commands.append(stripped)
    return commands


def _get(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _sources(recipe: str) -> list[tuple[str, str]]:
    """(heading, anchor) of each section of docs/recipes.md whose heading names ``recipe``."""
    from markdown.extensions.toc import slugify

    found = []
    name = recipe.removeprefix("configs/")
    for line in (ROOT / "docs" / "recipes.md").read_text().splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
            named = re.findall(r"`([^`]+)`", heading)
            if any(n == name or n == Path(name).name or n == f"configs/{name}" for n in named):
                found.append((heading, slugify(heading.replace("`", ""), "-")))
    return found


def recipe_page(path: Path) -> str:
    """The reference page of one recipe."""
    rel = path.relative_to(ROOT).as_posix()
    text = path.read_text()
    config = yaml.safe_load(text) or {}
    out = [f"# `{rel}`", ""]
    comment = header_comment(text)
    out += ["```text", comment, "```", ""] if comment else ["(no header comment)", ""]
    sources = _sources(rel)
    if sources:
        out += [
            "**Where its numbers come from:** "
            + "; ".join(f"[{h}](../../recipes.md#{a})" for h, a in sources),
            "",
        ]
    rows = [(k, _get(config, k)) for k in KEY_SETTINGS]
    rows = [(k, v) for k, v in rows if v is not None and not isinstance(v, (dict, list))]
    if rows:
        out += ["| setting | value |", "|---|---|"]
        out += [f"| `{k}` | `{v}` |" for k, v in rows]
        out.append("")
    out += ["## The file", "", "```yaml", text.rstrip(), "```", ""]
    return "\n".join(out)


def recipe_files() -> list[Path]:
    """Every recipe YAML under configs/ (suites and other non-fit files included)."""
    return sorted((ROOT / "configs").rglob("*.yaml"))


def recipe_pages() -> dict[str, str]:
    """``reference/recipes/<path>.md`` -> Markdown, plus the index table."""
    pages, rows = {}, []
    for path in recipe_files():
        rel = path.relative_to(ROOT / "configs").with_suffix("")
        page = f"reference/recipes/{rel.as_posix().replace('/', '__')}.md"
        pages[page] = recipe_page(path)
        first = header_comment(path.read_text()).splitlines()
        purpose = first[0] if first else ""
        rows.append(f"| [`configs/{rel.as_posix()}.yaml`]({Path(page).name}) | {purpose} |")
    intro = (
        "# Recipes\n\nEvery YAML in `configs/`, generated from the file itself at each docs "
        "build: its header comment, where its numbers come from, its key settings.\n\n"
        "| recipe | purpose |\n|---|---|\n"
    )
    pages["reference/recipes/index.md"] = intro + "\n".join(rows) + "\n"
    return pages


# --- MkDocs hooks ------------------------------------------------------------------------


def on_startup(command: str, dirty: bool) -> None:
    """Link the package tree before mkdocstrings sets its search paths (its ``on_config``)."""
    link_sources()


def on_config(config: Any) -> Any:
    """Add the generated sections to the navigation."""
    nav = config.get("nav")
    if nav is not None:
        nav.append({"Recipes": "reference/recipes/index.md"})
        nav.append({"API reference": "reference/api/index.md"})
    return config


def on_files(files: Any, config: Any) -> Any:
    """Add the generated recipe and API pages."""
    from mkdocs.structure.files import File

    for page, content in {**recipe_pages(), **api_pages()}.items():
        files.append(File.generated(config, page, content=content))
    return files
