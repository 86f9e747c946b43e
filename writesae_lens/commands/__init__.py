"""Subcommands of ``writesae`` beyond the core ones (demo, train, substitution), one module each.

A command module defines ``NAME`` (the subcommand), ``HELP`` (one line for ``writesae --help``), ``add_arguments(parser)``
and ``run(args) -> int``. ``writesae_lens.cli`` finds every module of this package that defines them, so adding a
command is adding a file. Heavy libraries are imported inside ``run``, so ``--help`` answers at once.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

_NOT_COMMANDS = {"common"}


def command_modules() -> list[ModuleType]:
    """The command modules of this package, in the order of their names."""
    modules = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name in _NOT_COMMANDS or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if all(hasattr(module, name) for name in ("NAME", "HELP", "add_arguments", "run")):
            modules.append(module)
    return modules
