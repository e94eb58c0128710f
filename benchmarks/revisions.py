"""Measuring code of this tree beside an older revision (--against, --cwd), across the package's rename.

Until the project became one import package (`longserve.server`, `longserve.patches`, `longserve.clients`),
its folders imported as top-level `server`, `patches` and `clients`. A benchmark that runs an older revision
meets both spellings. An alias finder makes one spelling load the other's modules, so each module is loaded
once and its classes stay one and the same. Written by hand: importlib has no module aliasing of its own.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
from pathlib import Path

FOLDERS = ("server", "patches", "clients")


def has_package(tree: Path | str) -> bool:
    """Whether the tree at `tree` is a revision with the `longserve` import package."""
    return (Path(tree) / "longserve" / "__init__.py").is_file()


def cli_module(tree: Path | str) -> str:
    """The module `python -m` runs for `longserve serve` in that tree."""
    return "longserve.server.cli" if has_package(tree) else "server.cli"


class Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of `alias.rest` load `real.rest` (the same module object, under both names)."""

    def __init__(self, names: dict[str, str]):
        self.names = names

    def _real(self, fullname: str) -> str | None:
        for alias, real in self.names.items():
            if fullname == alias or fullname.startswith(alias + "."):
                return real + fullname[len(alias):]
        return None

    def find_spec(self, fullname, path=None, target=None):
        if self._real(fullname) is None and fullname != "longserve":
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=True)

    def create_module(self, spec):
        real = self._real(spec.name)
        if real is None:  # the top `longserve` of an older tree: an empty package above the aliases
            package = types.ModuleType(spec.name)
            package.__path__ = []
            return package
        return importlib.import_module(real)

    def exec_module(self, module) -> None:
        pass


def new_names_to_old() -> None:
    """In an older tree: `longserve.server...` (this tree's measuring code) loads that tree's `server...`."""
    sys.meta_path.insert(0, Alias({f"longserve.{folder}": folder for folder in FOLDERS}))


def old_names_to_new() -> None:
    """In this tree: an older file's `server...` imports load this tree's `longserve.server...`."""
    sys.meta_path.insert(0, Alias({folder: f"longserve.{folder}" for folder in FOLDERS}))
