"""Fixtures of the TransformerLens tests ported to the three families (see each module's docstring for its source).

``model``: the tiny random test model of each family (non-square heads d_k != d_v; grouped key heads on Qwen3.5 and
Mamba-2), shared with the rest of the suite, so tests remove every hook they add. ``text_model``: the same kinds of
model with the shipped 4096-token tokenizer, for the string conveniences (a random Mamba-2 with d_state > head_dim,
and a random non-square RWKV-7)."""

import pytest
import torch

from family_models import family_model

FAMILIES = ("qwen35", "mamba2", "rwkv7")


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, qwen35_pair, mamba2_pair):
    torch.set_num_threads(1)
    hooked = family_model(request.param, qwen35_pair, mamba2_pair)
    hooked.reset_hooks(including_permanent=True)
    yield hooked
    hooked.reset_hooks(including_permanent=True)


@pytest.fixture(scope="module", params=("mamba2", "rwkv7"))
def text_model(request, tmp_path_factory):
    torch.set_num_threads(1)
    if request.param == "rwkv7":
        from transformers import AutoTokenizer

        from rwkv7_factory import random_rwkv7
        from writesae_lens.data import tokenizer_path

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path())
        return random_rwkv7(len(tokenizer), tokenizer, n_layers=2)
    from mamba2_factory import build_checkpoint_with_tokenizer
    from writesae_lens.adapters.mamba2 import HookedMamba2

    folder = build_checkpoint_with_tokenizer(tmp_path_factory.mktemp("mamba2_text") / "model")
    return HookedMamba2.from_pretrained(folder).eval()

