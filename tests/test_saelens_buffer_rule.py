"""docs/saes.md's buffer-size rule (#14 part 8) against SAELens itself: its activation store mixes a buffer of
``n_batches_in_buffer * training_context_size`` activations and refuses a training batch larger than that;
``store_batch_size_prompts`` does not enter, and ``training_context_size`` is the length of ``seqpos_slice``."""

from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "saes.md"


def bare_store(n_batches_in_buffer: int, training_context_size: int, train_batch_size_tokens: int):
    """An ActivationsStore holding only what its mixing data loader reads, fed constant activations."""
    from sae_lens.training.activations_store import ActivationsStore

    store = ActivationsStore.__new__(ActivationsStore)
    store.n_batches_in_buffer = n_batches_in_buffer
    store.training_context_size = training_context_size
    store.train_batch_size_tokens = train_batch_size_tokens
    store.activations_mixing_fraction = 0.5
    store.store_batch_size_prompts = 1000  # does not enter the rule
    store._iterate_filtered_activations = lambda: iter([torch.zeros(training_context_size, 3)] * 64)
    return store


def test_the_doc_states_the_rule():
    text = " ".join(DOC.read_text().split())
    assert "`n_batches_in_buffer * context_size >= train_batch_size_tokens`" in text
    assert "`n_batches_in_buffer >= train_batch_size_tokens`" in text  # the final-token recipe
    assert "n_batches_in_buffer * store_batch_size_prompts * context_size" not in text


@pytest.mark.parametrize("n_batches,context,batch,ok", [
    (4, 8, 32, True), (4, 8, 33, False),  # n_batches_in_buffer * context_size against train_batch_size_tokens
    (16, 1, 16, True), (15, 1, 16, False),  # seqpos_slice keeping one position: n_batches_in_buffer itself
])
def test_sae_lens_enforces_it(n_batches, context, batch, ok):
    loader = bare_store(n_batches, context, batch).get_data_loader()
    if ok:
        assert next(loader).shape == (batch, 3)
    else:
        with pytest.raises(ValueError, match="Buffer size must be greater than or equal to batch size"):
            next(loader)

