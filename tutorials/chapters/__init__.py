"""Tutorial notebooks 04 on, one module each: ``NOTEBOOK`` (the file name, e.g. ``"04_the_closed_form.ipynb"``) and
``CELLS`` (built with ``tutorials/cells.py``). ``build_notebooks.py`` collects them in the order of their file names."""

from __future__ import annotations

import importlib
import pkgutil


def chapter_notebooks() -> dict:
    notebooks = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "NOTEBOOK") and hasattr(module, "CELLS"):
            notebooks[module.NOTEBOOK] = module.CELLS
    return dict(sorted(notebooks.items()))
