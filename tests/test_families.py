"""The same SAE training + substitution code on every family shipped with the package: no per-family branches."""

import pytest
import torch

from writesae_lens import interventions as iv
from writesae_lens import pipeline
from writesae_lens.evaluation.substitution import head_states, replacement_test
from writesae_lens.models import load_hooked_model


@pytest.mark.parametrize("name,layer,head", [("qwen35-tiny", 2, 1), ("mamba2-tiny", 3, 2)])
def test_train_and_substitute_on_each_family(name, layer, head, tmp_path):
    torch.set_num_threads(1)
    model = load_hooked_model(name)
    train_docs, eval_docs = pipeline.split_documents(pipeline.load_texts(None)[:80])
    settings = pipeline.TrainSettings(layer=layer, head=head, d_sae=64, k=4, context_size=64,
                                      training_tokens=64 * 8 * 40, batch_tokens=512, lr=3e-3, warmup_steps=5)
    sae = pipeline.train_state_sae(model, train_docs, settings, tmp_path / "sae")
    passages = pipeline.token_passages(model, eval_docs, 3, 48)
    records = replacement_test(model, sae, layer, head, passages, max_firings=12, progress=False)
    assert len(records) == 12

    # every record equals the hook path for that firing alone (one batch row per firing)
    states, factors = head_states(model, passages, layer, head)
    atoms = iv.atom_matrices(sae, records.atom.tolist(), len(records))
    cells, matrices = [], []
    for i, row in enumerate(records.itertuples()):
        p, t = row.passage, row.position
        native = factors["beta"][p, t] * torch.outer(factors["k"][p, t], factors["v"][p, t])
        cells.append((i, t, head))
        matrices.append(row.coefficient * atoms[i] - native)
    with torch.no_grad():
        native_logp = torch.log_softmax(model(passages).double(), -1)
        edited = model.run_with_hooks(passages[records.passage.tolist()],
                                      fwd_hooks=iv.add_to_state(layer, cells, torch.stack(matrices), "after_read"))
    edited_logp = torch.log_softmax(edited.double(), -1)
    for i, row in enumerate(records.itertuples()):
        n, e = native_logp[row.passage, row.position + 1], edited_logp[i, row.position + 1]
        assert abs(float((n.exp() * (n - e)).sum()) - row.kl_atom) <= 1e-5
