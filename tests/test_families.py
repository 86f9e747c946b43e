"""The same SAE training + substitution code on every family: no per-family branches.

The three trained models shipped with the package, and a random RWKV-7 with the shipped tokenizer and non-square heads
(d_k != d_v, so that an axis mistake shows; the shipped models' heads are square).
"""

import pytest
import torch

from rwkv7_factory import random_rwkv7
from substitution_checks import assert_records_match_hook_path
from writesae_lens import pipeline
from writesae_lens.evaluation.substitution import replacement_test
from writesae_lens.models import load_hooked_model


def load(name):
    if name == "rwkv7-random":
        from transformers import AutoTokenizer

        from writesae_lens.data import tokenizer_path

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path())
        return random_rwkv7(len(tokenizer), tokenizer)
    return load_hooked_model(name)


@pytest.mark.parametrize("name,layer,head", [("qwen35-tiny", 2, 1), ("mamba2-tiny", 3, 2), ("rwkv7-tiny", 2, 1),
                                             ("rwkv7-random", 1, 2)])
def test_train_and_substitute_on_each_family(name, layer, head, tmp_path):
    torch.set_num_threads(1)
    model = load(name)
    train_docs, eval_docs = pipeline.split_documents(pipeline.load_texts(None)[:80])
    settings = pipeline.TrainSettings(layer=layer, head=head, d_sae=64, k=4, context_size=64,
                                      training_tokens=64 * 8 * 40, batch_tokens=512, lr=3e-3, warmup_steps=5)
    sae = pipeline.train_state_sae(model, train_docs, settings, tmp_path / "sae")
    passages = pipeline.token_passages(model, eval_docs, 3, 48)
    # both edit timings and both KL read-outs, each record equal to the hook path for that firing alone
    for timing, kl_at in (("after_read", "next"), ("write", "end")):
        records = replacement_test(model, sae, layer, head, passages, max_firings=12, timing=timing, kl_at=kl_at,
                                   batch_size=10, progress=False)
        assert len(records) == 12
        assert assert_records_match_hook_path(model, sae, layer, head, passages, records, timing, kl_at) >= 12
