"""How attnzoo's packages depend on each other, and its console scripts.

Imports go one way, data -> interop -> train (the command lines live in attnzoo.train): attnzoo.data imports
neither attnzoo.interop nor attnzoo.train, and attnzoo.interop does not import attnzoo.train, counting imports made
inside functions too."""

import ast
import importlib
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"attnzoo/data": ("attnzoo.interop", "attnzoo.train"), "attnzoo/interop": ("attnzoo.train",)}


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` / `from ... import` in the file names (a `from` also names `module.name`, which may
    be a submodule), relative imports made absolute."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("package", FORBIDDEN)
def test_lower_packages_import_nothing_from_higher_ones(package):
    offending = sorted(f"{path.relative_to(ROOT)} imports {name}"
                       for path in (ROOT / package).rglob("*.py") for name in imported_modules(path)
                       if any(name == above or name.startswith(above + ".") for above in FORBIDDEN[package]))
    assert offending == []


def test_console_scripts_name_existing_functions():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["attnzoo-export"] == "attnzoo.train.export_cli:main"
    for name, target in scripts.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name
