"""SAE.load_from_disk of a WriteSAE in a fresh process that never imports writesae_lens.saes (issue #14, part 4).

SAELens has no plugin mechanism; `writesae_lens_plugin` is run from a .pth file at interpreter start. The
test installs that .pth in a temporary site directory (what the package's install does) and loads in a subprocess.
"""

import subprocess
import sys

import pytest
import torch

from sae_test_data import low_rank_states, make_inference_sae
from writesae_lens_plugin import PTH_LINE, LazyWriteRegistry

LOAD = """
import sys{prelude}
from sae_lens import SAE
import torch
sae = SAE.load_from_disk(sys.argv[1])
assert "writesae_lens.saes" in sys.modules
x = torch.load(sys.argv[2])
torch.save(sae(x).detach(), sys.argv[3])
print(type(sae).__name__)
"""


def run_fresh(code: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a fresh interpreter importing torch and SAELens: ~20 s alone, minutes on a loaded machine
def test_a_fresh_process_loads_a_write_sae_through_the_pth_hook(tmp_path):
    sae = make_inference_sae("write_topk", "bilinear", False, 2)
    sae.save_model(tmp_path / "sae")
    states = low_rank_states(5)
    torch.save(states, tmp_path / "x.pt")
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "writesae_lens_sae_lens.pth").write_text(PTH_LINE)
    prelude = f"\nimport site; site.addsitedir({str(site_dir)!r})"
    done = run_fresh(LOAD.format(prelude=prelude), tmp_path / "sae", tmp_path / "x.pt", tmp_path / "y.pt")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("WriteTopKSAE")
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), sae(states))


def test_lazy_registry_answers_only_write_architectures():
    registry = LazyWriteRegistry({"standard": 1})
    assert registry["standard"] == 1
    try:
        registry["no_such_architecture"]
    except KeyError as error:
        assert error.args == ("no_such_architecture",)
    else:
        raise AssertionError("an unknown architecture must stay a KeyError")
    assert "write_topk" not in registry  # membership never imports
