"""Let SAELens find the WriteSAE architectures without `import writesae_lens.saes` first.

SAELens (6.54) keeps its architectures in two plain dicts in `sae_lens.registry` and has no plugin or entry-point
mechanism: `SAE.load_from_disk` on a saved WriteSAE in a fresh process fails with `KeyError: 'write_topk'` unless
`writesae_lens.saes` was imported. `install()` closes that gap at no import cost: once `sae_lens.registry` is
imported (or right away, if it already is), its two registries become dicts that, asked for a WriteSAE architecture
they do not hold yet, import `writesae_lens.saes` (which registers every WriteSAE class) and answer.

It is meant to run at interpreter start from a `.pth` file in site-packages holding the one line

    import writesae_lens_plugin; writesae_lens_plugin.install()

Importing this module imports neither torch nor SAELens nor `writesae_lens`: it is a top-level module of its own
because a package imported at interpreter start could no longer be instrumented by import hooks installed later
(jaxtyping's type checking in the tests, for one).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

WRITE_ARCHITECTURES = frozenset({"write_topk", "write_batchtopk", "write_jumprelu"})
_REGISTRY_MODULE = "sae_lens.registry"
_REGISTRY_NAMES = ("SAE_CLASS_REGISTRY", "SAE_TRAINING_CLASS_REGISTRY")
PTH_LINE = "import writesae_lens_plugin; writesae_lens_plugin.install()\n"


class LazyWriteRegistry(dict):
    """A SAELens registry that imports writesae_lens.saes the first time a WriteSAE architecture is looked up."""

    def __missing__(self, architecture):
        if architecture not in WRITE_ARCHITECTURES:
            raise KeyError(architecture)
        import writesae_lens.saes  # noqa: F401  (registers every WriteSAE class into this dict)

        if not dict.__contains__(self, architecture):
            raise KeyError(architecture)
        return dict.__getitem__(self, architecture)


def _make_registries_lazy(module) -> None:
    for name in _REGISTRY_NAMES:
        registry = getattr(module, name, None)
        if isinstance(registry, dict) and not isinstance(registry, LazyWriteRegistry):
            setattr(module, name, LazyWriteRegistry(registry))


class _AfterRegistryImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import `sae_lens.registry` as usual, then make its registries lazy before anything imports them by name."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        self._inner = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _make_registries_lazy(module)


def install() -> None:
    """Make SAELens' registries resolve WriteSAE architectures on demand (idempotent)."""
    module = sys.modules.get(_REGISTRY_MODULE)
    if module is not None:
        _make_registries_lazy(module)
        return
    if not any(isinstance(finder, _AfterRegistryImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterRegistryImport())
