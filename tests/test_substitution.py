"""The substitution test and the intervention helpers, against the hook path and the naive reference."""

import pytest
import torch

from sae_checks import firing_sae
from substitution_checks import assert_records_match_hook_path
from writesae_lens.evaluation.records import RECORD_COLUMNS
from writesae_lens.evaluation.stats import format_summary, summarize
from writesae_lens.evaluation.substitution import replacement_test

LAYER, HEAD = 1, 2


@pytest.fixture(scope="module")
def model(qwen35_pair):
    return qwen35_pair[1]


@pytest.fixture(scope="module")
def passages():
    return torch.randint(0, 100, (3, 40), generator=torch.Generator().manual_seed(31))


@pytest.fixture(scope="module")
def sae(model, passages):
    """A WriteSAE on head HEAD's states: random factors, decoder bias at the data mean, so that it fires."""
    return firing_sae(model, passages, LAYER, HEAD)


@pytest.mark.parametrize("timing,kl_at", [("after_read", "next"), ("write", "next"), ("after_read", "end")])
def test_records_equal_the_hook_path(model, sae, passages, timing, kl_at):
    records = replacement_test(model, sae, LAYER, HEAD, passages, max_firings_per_feature=3, max_firings=24,
                               timing=timing, kl_at=kl_at, batch_size=15, progress=False)
    assert list(records.columns)[: len(RECORD_COLUMNS)] == list(RECORD_COLUMNS)
    assert len(records) >= 12
    assert assert_records_match_hook_path(model, sae, LAYER, HEAD, passages, records, timing, kl_at) >= 20
    assert model.cfg.d_k != model.cfg.d_v
    if timing == "after_read":
        assert (records.position < passages.shape[1] - 1).all()


def test_statistics_run_on_the_records(model, sae, passages, tmp_path):
    from writesae_lens.evaluation.plots import plot_kl_scatter
    from writesae_lens.evaluation.records import load_records, save_records

    records = replacement_test(model, sae, LAYER, HEAD, passages, max_firings_per_feature=5, progress=False)
    summary = summarize(records, n_cluster_resamples=200, n_permutations=200, n_atom_resamples=200)
    text = format_summary(summary)
    assert "win" in text.lower()
    path = save_records(records, tmp_path / "records.csv")
    assert load_records(path).shape == records.shape
    assert plot_kl_scatter(records, tmp_path / "scatter.png").stat().st_size > 1000


def test_caps_and_seed(model, sae, passages):
    a = replacement_test(model, sae, LAYER, HEAD, passages, max_firings_per_feature=2, seed=1, progress=False)
    b = replacement_test(model, sae, LAYER, HEAD, passages, max_firings_per_feature=2, seed=1, progress=False)
    assert a.equals(b)
    assert a.groupby("feature").size().max() <= 2
    c = replacement_test(model, sae, LAYER, HEAD, passages, max_firings=5, seed=1, progress=False)
    assert len(c) == 5


def test_bad_input(model, sae, passages):
    with pytest.raises(ValueError, match=r"layer 3 is not a recurrent layer.*\[0, 1, 2\]"):
        replacement_test(model, sae, 3, HEAD, passages, progress=False)
    with pytest.raises(ValueError, match="head 7 is out of range"):
        replacement_test(model, sae, LAYER, 7, passages, progress=False)
    sae.cfg.metadata.hook_head_index = 0
    try:
        with pytest.raises(ValueError, match="trained on head 0"):
            replacement_test(model, sae, LAYER, HEAD, passages, progress=False)
    finally:
        sae.cfg.metadata.hook_head_index = None
    sae.cfg.metadata.hook_name = "blocks.0.mixer.hook_state"
    try:
        with pytest.raises(ValueError, match="trained on 'blocks.0.mixer.hook_state'"):
            replacement_test(model, sae, LAYER, HEAD, passages, progress=False)
    finally:
        sae.cfg.metadata.hook_name = None
    with torch.no_grad():
        saved = sae.b_dec.clone()
        sae.b_enc.fill_(-1e6)  # nothing fires
    try:
        with pytest.raises(ValueError, match="no firings"):
            replacement_test(model, sae, LAYER, HEAD, passages, progress=False)
    finally:
        with torch.no_grad():
            sae.b_enc.zero_()
            sae.b_dec.copy_(saved)


def test_records_do_not_depend_on_batching(model, sae, passages, monkeypatch):
    """Rows per batch, passages per native pass and rows per KL block change how the work is cut, not the records."""
    from writesae_lens.evaluation import edited_runs

    kwargs = dict(max_firings_per_feature=3, max_firings=20, progress=False)
    reference = replacement_test(model, sae, LAYER, HEAD, passages, **kwargs)
    monkeypatch.setattr(edited_runs, "_kl_block_rows", lambda d_vocab, device: 2)
    cut = replacement_test(model, sae, LAYER, HEAD, passages, batch_size=7, passage_batch_size=2, **kwargs)
    assert cut[["passage", "position", "feature", "atom"]].equals(reference[["passage", "position", "feature", "atom"]])
    kl_columns = [c for c in reference.columns if c.startswith("kl_")]
    assert (cut[kl_columns] - reference[kl_columns]).abs().to_numpy().max() < 1e-7
    top1 = [c for c in reference.columns if c.startswith("top1_")]
    assert cut[top1].equals(reference[top1])


def test_kl_both_directions_equals_the_plain_formulas():
    from writesae_lens.evaluation.edited_runs import kl_both_directions

    generator = torch.Generator().manual_seed(5)
    native = torch.log_softmax(torch.randn(6, 50, generator=generator, dtype=torch.float64) * 3, dim=-1)
    logits = torch.randn(6, 50, generator=generator) * 3
    forward, reverse = kl_both_directions(native, native.exp(), logits)
    condition = torch.log_softmax(logits.double(), dim=-1)
    assert torch.allclose(forward, (native.exp() * (native - condition)).sum(-1), atol=1e-12)
    assert torch.allclose(reverse, (condition.exp() * (condition - native)).sum(-1), atol=1e-12)
    same, same_rev = kl_both_directions(native, native.exp(), native.float())
    assert same.abs().max() < 1e-6 and same_rev.abs().max() < 1e-6


def test_passages_as_batches_or_a_dataset_give_the_same_records(model, sae, passages):
    import datasets

    kwargs = dict(max_firings_per_feature=2, max_firings=8, progress=False)
    reference = replacement_test(model, sae, LAYER, HEAD, passages, **kwargs)
    as_batches = replacement_test(model, sae, LAYER, HEAD, [passages[:2], passages[2]], **kwargs)
    as_dataset = replacement_test(model, sae, LAYER, HEAD, datasets.Dataset.from_dict({"input_ids": passages.tolist()}),
                                  **kwargs)
    assert as_batches.equals(reference) and as_dataset.equals(reference)


def test_passages_of_unequal_length_or_unknown_form_are_refused(model, sae, passages):
    import datasets

    with pytest.raises(ValueError, match=r"same number of tokens.*token_passages"):
        replacement_test(model, sae, LAYER, HEAD, [passages[0], passages[1, :30]], progress=False)
    with pytest.raises(ValueError, match=r"column of token ids named one of \('tokens', 'input_ids'\)"):
        replacement_test(model, sae, LAYER, HEAD, datasets.Dataset.from_dict({"text": ["a", "b"]}), progress=False)
    with pytest.raises(TypeError, match="passages must be a token tensor"):
        replacement_test(model, sae, LAYER, HEAD, {"tokens": passages}, progress=False)
    with pytest.raises(ValueError, match="passage_batch_size must be a positive integer, got 0"):
        replacement_test(model, sae, LAYER, HEAD, passages, passage_batch_size=0, progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        replacement_test(model, sae, LAYER, HEAD, passages, batch_size=-1, progress=False)
    with pytest.raises(ValueError, match="no passages"):
        replacement_test(model, sae, LAYER, HEAD, datasets.Dataset.from_dict({"tokens": []}), progress=False)
