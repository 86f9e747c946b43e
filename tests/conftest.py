import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from mamba2_factory import CONFIGS as MAMBA2_CONFIGS  # noqa: E402
from mamba2_factory import build_checkpoint as build_mamba2_checkpoint  # noqa: E402
from qwen35_factory import CONFIGS, build_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def qwen35_folders(tmp_path_factory) -> dict[str, Path]:
    """One saved tiny random checkpoint per named configuration."""
    root = tmp_path_factory.mktemp("qwen35")
    return {name: build_checkpoint(name, root / name, seed=i) for i, name in enumerate(CONFIGS)}


@pytest.fixture(scope="session")
def qwen35_pair(qwen35_folders):
    """(transformers model, HookedQwen35) on the same non-square GQA weights."""
    from transformers import Qwen3_5ForCausalLM

    from writesae_lens.adapters.qwen35 import HookedQwen35

    folder = qwen35_folders["gqa_nonsquare"]
    return Qwen3_5ForCausalLM.from_pretrained(folder).eval(), HookedQwen35.from_pretrained(folder).eval()


@pytest.fixture(scope="session")
def mamba2_folders(tmp_path_factory) -> dict[str, Path]:
    """One saved tiny random Mamba-2 checkpoint per named configuration."""
    root = tmp_path_factory.mktemp("mamba2")
    return {name: build_mamba2_checkpoint(name, root / name, seed=i) for i, name in enumerate(MAMBA2_CONFIGS)}


@pytest.fixture(scope="session")
def mamba2_pair(mamba2_folders):
    """(transformers model, HookedMamba2) on the grouped, non-square weights."""
    from transformers import Mamba2ForCausalLM

    from writesae_lens.adapters.mamba2 import HookedMamba2

    folder = mamba2_folders["grouped_nonsquare"]
    return Mamba2ForCausalLM.from_pretrained(folder).eval(), HookedMamba2.from_pretrained(folder).eval()


@pytest.fixture()
def one_thread():
    """One torch thread for the test, restored afterwards (tiny models; the machines are shared). Modules use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
