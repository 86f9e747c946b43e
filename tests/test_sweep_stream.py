"""The shared activation stream: a cell trained in a sweep is the cell trained alone by the single-cell pipeline."""

import pytest
import torch
from sae_lens import SAE

import writesae_lens.saes  # noqa: F401  (registers the WriteSAE architectures)
from writesae_lens import pipeline
from writesae_lens.data import load_heldout_documents
from writesae_lens.models import load_hooked_model
from writesae_lens.sweeps.stream import prepare_cell, train_cells


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_hooked_model("qwen35-tiny")


@pytest.fixture(scope="module")
def documents():
    train, _ = pipeline.split_documents(load_heldout_documents())
    return train


def tiny(layer, head, seed, **changes):
    base = dict(layer=layer, head=head, d_sae=16, k=4, context_size=16, training_tokens=384, batch_tokens=64,
                lr=3e-3, warmup_steps=1, seed=seed)
    return pipeline.TrainSettings(**{**base, **changes})


def assert_same_sae(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("final_token_only, batches_per_pass", [(False, 1), (True, 1), (True, 4)],
                         ids=["all_positions", "final_token", "final_token_4_batches_per_pass"])
def test_cells_trained_from_one_stream_equal_cells_trained_alone(model, documents, tmp_path, final_token_only,
                                                                 batches_per_pass):
    changes = dict(final_token_only=True)
    cells = {"l0h1s5": tiny(0, 1, 5), "l2h3s7": tiny(2, 3, 7), "l2h3s5r2": tiny(2, 3, 5, rank=2)}
    if final_token_only:  # one state per context, one context per model pass: fewer cells and steps
        cells = {"l0h1s5": tiny(0, 1, 5, batch_tokens=4, training_tokens=12, **changes),
                 "l2h3s5r2": tiny(2, 3, 5, rank=2, batch_tokens=4, training_tokens=12, **changes)}
    prepared = [prepare_cell(name, pipeline.train_state_sae, model, documents, s, tmp_path / "sweep" / name, "cpu")
                for name, s in cells.items()]
    assert not (tmp_path / "sweep").exists()  # preparing trains and writes nothing
    before = torch.get_rng_state()
    swept = train_cells(prepared, progress=False, batches_per_pass=batches_per_pass)
    assert torch.equal(before, torch.get_rng_state())
    for name, settings in cells.items():
        alone = pipeline.train_state_sae(model, documents, settings, tmp_path / "alone" / name)
        assert_same_sae(swept[name], alone)
        loaded = SAE.load_from_disk(tmp_path / "sweep" / name)
        assert_same_sae(loaded, SAE.load_from_disk(tmp_path / "alone" / name))
        assert loaded.cfg.metadata.hook_name == f"blocks.{settings.layer}.mixer.hook_state"
        assert loaded.cfg.metadata.hook_head_index == settings.head


def test_one_model_pass_per_batch_feeds_every_cell(model, documents, tmp_path, monkeypatch):
    calls = []
    original = type(model).run_with_cache

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("names_filter"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "run_with_cache", counted)
    prepared = [prepare_cell(f"l{layer}h{head}", pipeline.train_state_sae, model, documents, tiny(layer, head, 1),
                             tmp_path / f"l{layer}h{head}", "cpu") for layer in (0, 1, 2) for head in (0, 3)]
    train_cells(prepared, progress=False)
    # 6 steps of 64 states from contexts of 16 tokens, 4 contexts per pass, through a 256-state mixing buffer
    assert len(calls) == 8
    assert all(sorted(names) == [f"blocks.{i}.mixer.hook_state" for i in range(3)] for names in calls)


def test_batches_per_pass_must_be_positive(model, documents, tmp_path):
    cell = prepare_cell("a", pipeline.train_state_sae, model, documents, tiny(0, 0, 1), tmp_path / "a", "cpu")
    with pytest.raises(ValueError, match="batches_per_pass must be a positive integer"):
        train_cells([cell], progress=False, batches_per_pass=0)


def test_cells_that_cannot_share_a_stream_are_refused(model, documents, tmp_path):
    a = prepare_cell("a", pipeline.train_state_sae, model, documents, tiny(0, 0, 1), tmp_path / "a", "cpu")
    b = prepare_cell("b", pipeline.train_state_sae, model, documents, tiny(0, 1, 1, context_size=32), tmp_path / "b",
                     "cpu")
    with pytest.raises(ValueError, match="cannot share one activation stream"):
        train_cells([a, b], progress=False)


@pytest.mark.parametrize("architecture, k", [("jumprelu", 32), ("batchtopk", 2.5)])
def test_variant_architectures_train_in_the_stream_each_with_its_own_metadata(model, documents, tmp_path,
                                                                               architecture, k):
    from writesae_lens.sweeps.config import Variant
    from writesae_lens.sweeps.run import variant_sae_factory

    variant = Variant(name="v", architecture=architecture, rank=2, d_sae=16, k=k)
    factory = variant_sae_factory(variant, model.cfg, "cpu")
    cells = {"l0h1": tiny(0, 1, 5, training_tokens=128), "l2h3": tiny(2, 3, 5, training_tokens=128)}
    prepared = [prepare_cell(name, pipeline.train_state_sae, model, documents, s, tmp_path / name, "cpu",
                             replace_sae=factory) for name, s in cells.items()]
    train_cells(prepared, progress=False)
    for name, settings in cells.items():
        loaded = SAE.load_from_disk(tmp_path / name)
        assert loaded.cfg.architecture() == "write_jumprelu"  # BatchTopK is saved as JumpReLU, as in SAELens
        assert loaded.cfg.rank == 2
        assert loaded.cfg.metadata.hook_name == f"blocks.{settings.layer}.mixer.hook_state"
        assert loaded.cfg.metadata.hook_head_index == settings.head
