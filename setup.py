"""Package discovery for writesae-lens (all other metadata is in pyproject.toml).

The folder `adapters/` sits at the top of the repository, one module per model family, but it installs as the
subpackage `writesae_lens.adapters`: an unrelated, popular PyPI package already owns the top-level import name
`adapters`, and we must never shadow it. setuptools' `package_dir` mapping does this for regular and editable installs.
"""

from setuptools import find_packages, setup

core_packages = find_packages(include=["writesae_lens", "writesae_lens.*"])
adapter_packages = ["writesae_lens." + name for name in find_packages(include=["adapters", "adapters.*"])]

setup(
    packages=core_packages + adapter_packages,
    package_dir={"writesae_lens.adapters": "adapters"},
)
