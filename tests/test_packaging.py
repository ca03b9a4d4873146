"""Packaging: every source folder is installed, under mmpt.*, and nothing installs bare."""

from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> tuple[set[str], dict[str, str]]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(cfg["packages"]), cfg["package-dir"]


def _folder_of(package: str, package_dir: dict[str, str]) -> Path:
    parts = package.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in package_dir:
            return ROOT / package_dir[prefix] / Path(*parts[i:])
    return ROOT / Path(*parts)


def test_every_package_folder_is_listed_in_pyproject():
    packages, package_dir = _declared()
    tops = (("mmpt", "mmpt"), ("models", "mmpt.models"), ("datamodules", "mmpt.datamodules"))
    for top, name in tops:
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            dotted = ".".join([name, *rel.parts]) if rel.parts else name
            assert dotted in packages, f"{init.parent} missing from pyproject's packages ({dotted})"


def test_listed_packages_exist_and_nothing_installs_as_bare_models():
    packages, package_dir = _declared()
    assert all(p == "mmpt" or p.startswith("mmpt.") for p in packages)
    for p in packages:
        assert (_folder_of(p, package_dir) / "__init__.py").is_file(), p
    assert package_dir["mmpt.models"] == "models"
    assert package_dir["mmpt.datamodules"] == "datamodules"


def test_installed_names_import():
    import mmpt.datamodules.image_text
    import mmpt.models.contrastive

    assert mmpt.models.contrastive.__file__.endswith("models/contrastive.py")
    assert mmpt.datamodules.image_text.__file__.endswith("datamodules/image_text.py")
