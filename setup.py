"""Package discovery for writesae-lens (all other metadata is in pyproject.toml).

The folder `adapters/` sits at the top of the repository, one module per model family, but it installs as the
subpackage `writesae_lens.adapters`: an unrelated, popular PyPI package already owns the top-level import name
`adapters`, and we must never shadow it. setuptools' `package_dir` mapping does this for regular and editable installs.

`writesae_lens_sae_lens.pth` goes to site-packages beside the package (regular and editable installs): its one line
lets SAELens load a saved WriteSAE in a process that never imported `writesae_lens.saes`
(the top-level module `writesae_lens_plugin.py` says how; SAELens has no plugin mechanism).
"""

from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "writesae_lens_sae_lens.pth"
PTH_LINE = "import writesae_lens_plugin; writesae_lens_plugin.install()\n"


class build_py_with_pth(build_py):
    """build_py, plus the .pth file at the root of the build (the root of site-packages once installed)."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / PTH_NAME
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(PTH_LINE, encoding="utf-8")

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH_NAME)]


class editable_wheel_with_pth(editable_wheel):
    """editable_wheel, plus the .pth file among the files the editable wheel installs into site-packages. It rides
    on setuptools' own step that writes the namespace .pth files there (a setuptools that lacks it installs without
    the plugin line: `import writesae_lens.saes` before loading is then needed, as the docs say)."""

    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        Path(installation_dir, PTH_NAME).write_text(PTH_LINE, encoding="utf-8")


core_packages = find_packages(include=["writesae_lens", "writesae_lens.*"])
adapter_packages = ["writesae_lens." + name for name in find_packages(include=["adapters", "adapters.*"])]

setup(
    packages=core_packages + adapter_packages,
    py_modules=["writesae_lens_plugin"],
    package_dir={"writesae_lens.adapters": "adapters"},
    cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth},
)
