"""`adapters/` installs as `writesae_lens.adapters`, never as a top-level `adapters` package."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_current_install_imports_adapters_as_subpackage():
    import writesae_lens.adapters as adapters
    from writesae_lens.adapters import HookedQwen35

    assert adapters.__name__ == "writesae_lens.adapters"
    assert HookedQwen35.__module__ == "writesae_lens.adapters.qwen35.model"


def _build_wheel(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True)
    return next(out.glob("writesae_lens-*.whl"))


def test_regular_install_layout(tmp_path):
    wheel = _build_wheel(tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    assert "writesae_lens/adapters/__init__.py" in names
    assert "writesae_lens/adapters/qwen35/model.py" in names
    assert not any(n.startswith("adapters/") for n in names), "a top-level `adapters` package would shadow PyPI's"
    _check_plugin_line(zipfile.ZipFile(wheel))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    out = _locate(tmp_path, target)
    assert out[0] == str(target / "writesae_lens" / "adapters" / "qwen35" / "__init__.py") and out[1] == "None"


@pytest.mark.parametrize("mode", ["lenient", "strict"])
def test_editable_install_layout(tmp_path, mode):
    """Build the PEP 660 editable wheel with setuptools' own hook and unpack it into an empty site directory (pip is
    not used: installing elsewhere would uninstall the environment's own editable install)."""
    wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
    wheel_dir.mkdir()
    build = ("import sys, setuptools.build_meta as b; "
             "print(b.build_editable(sys.argv[1], {'editable_mode': sys.argv[2]}))")
    name = subprocess.run([sys.executable, "-c", build, str(wheel_dir), mode], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.split()[-1]
    zipfile.ZipFile(wheel_dir / name).extractall(site)
    _check_plugin_line(zipfile.ZipFile(wheel_dir / name))
    out = _locate(tmp_path, site)
    if mode == "lenient":
        assert out[0] == str(ROOT / "adapters" / "qwen35" / "__init__.py")
    else:  # strict mode links the files into a build folder that mirrors the installed layout
        assert out[0].endswith("writesae_lens/adapters/qwen35/__init__.py")
    assert out[1] == "None"


def _check_plugin_line(wheel: zipfile.ZipFile) -> None:
    """The wheel installs the .pth that lets SAELens find the WriteSAE architectures (writesae_lens_plugin.py)
    at the root of site-packages."""
    from writesae_lens_plugin import PTH_LINE

    assert wheel.read("writesae_lens_sae_lens.pth").decode() == PTH_LINE


def test_this_environment_has_the_plugin_line():
    """The environment the suite runs in was installed with the .pth (as README's install does)."""
    import writesae_lens
    from writesae_lens_plugin import PTH_LINE

    import site

    candidates = [Path(d) / "writesae_lens_sae_lens.pth" for d in (*site.getsitepackages(), site.getusersitepackages())]
    found = [c for c in candidates if c.exists()]
    assert found, f"no writesae_lens_sae_lens.pth in {[str(c.parent) for c in candidates]} ({writesae_lens.__file__})"
    assert found[0].read_text() == PTH_LINE


def _locate(cwd: Path, site_dir: Path) -> list[str]:
    """Where a fresh interpreter that sees only ``site_dir`` (``-S``: no other site-packages) finds the adapters."""
    code = ("import site, sys, importlib.util as u; site.addsitedir(sys.argv[1]); "
            "print(u.find_spec('writesae_lens.adapters.qwen35').origin); print(u.find_spec('adapters'))")
    return subprocess.run([sys.executable, "-S", "-c", code, str(site_dir)], cwd=cwd, capture_output=True, text=True,
                          check=True).stdout.split()


def test_wheel_ships_the_data(tmp_path):
    names = zipfile.ZipFile(_build_wheel(tmp_path / "dist")).namelist()
    for name in ("writesae_lens/data/heldout_eval.txt", "writesae_lens/data/tokenizer/tokenizer.json",
                 "writesae_lens/data/models/MODEL_CARD.md", "writesae_lens/data/models/qwen35-tiny/model.safetensors",
                 "writesae_lens/data/models/mamba2-tiny/config.json",
                 "writesae_lens/data/models/rwkv7-tiny/model.safetensors", "writesae_lens/dashboard/templates/atom.html",
                 "writesae_lens/dashboard/templates/index.html", "writesae_lens/dashboard/templates/style.css"):
        assert name in names, name
