"""The batched generation engine: every row equals the same prompt, edits and seed generated alone, and the naive
reference (the whole sequence re-run at every step with ``interventions.add_to_state``); the edit formula against
its readable reference; bad input."""

import pytest
import torch

from test_padding import family_model
from writesae_lens import interventions as iv
from writesae_lens.generation import CacheEdit, Push, edit_matrices, generate_rows, reference_edit_matrix
from writesae_lens.generation.edits import stacked


@pytest.fixture(scope="module", params=("qwen35", "mamba2", "rwkv7"))
def model(request, qwen35_folders, mamba2_folders):
    torch.set_num_threads(1)
    return family_model(request.param, qwen35_folders, mamba2_folders)


def recurrent_layers(model):
    return [i for i, b in enumerate(model.blocks) if hasattr(b, "mixer")]


def prompts_and_edits(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, model.cfg.d_vocab, (n,), generator=generator) for n in (7, 4, 9, 5, 6)]
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    layers = recurrent_layers(model)
    a, b = layers[0], layers[-1]
    value = torch.randn(d_v, generator=generator)
    edits = [
        # the install: three consecutive prompt positions, value v, the unit write key, m times the write's norm
        *[CacheEdit(row=0, position=t, layer=a, head=1, value=value / value.norm(), scale=3.0, relative=True)
          for t in (4, 5, 6)],
        CacheEdit(row=1, position=1, layer=b, head=0, scale=-1.0, relative=True),  # delete the write
        CacheEdit(row=2, position=10, layer=a, head=2, key=torch.randn(d_k, generator=generator),
                  value=torch.randn(d_v, generator=generator), scale=0.7),  # a fixed atom at a generated position
        CacheEdit(row=3, position=4, layer=a, head=0, value=value, scale=2.0, relative=True),  # the prompt's last
        CacheEdit(row=4, position=7, layer=a, head=1, scale=-1.0, relative=True),  # delete a generated token's write
    ]
    pushes = [Push(row=4, layer=b, head=1, matrix=0.3 * torch.randn(d_k, d_v, generator=generator))]
    return prompts, edits, pushes


def alone(edits, row):
    return [CacheEdit(**{**e.__dict__, "row": 0}) for e in edits if e.row == row]


def test_batched_rows_equal_each_row_alone_greedy(model):
    prompts, edits, pushes = prompts_and_edits(model)
    watch = torch.tensor([[3, 5], [7, -1], [1, 2], [0, 4], [6, -1]])
    batched = generate_rows(model, prompts, max_new_tokens=6, edits=edits, pushes=pushes, watch=watch, batch_size=3)
    for row, prompt in enumerate(prompts):
        push = [Push(0, p.layer, p.head, p.matrix) for p in pushes if p.row == row]
        one = generate_rows(model, [prompt], max_new_tokens=6, edits=alone(edits, row), pushes=push,
                            watch=watch[row : row + 1])
        assert batched.tokens[row].tolist() == one.tokens[0].tolist()
        assert torch.allclose(batched.watch_logp[row], one.watch_logp[0], atol=1e-5, equal_nan=True)
        assert batched.watch_rank[row].tolist() == one.watch_rank[0].tolist()
    # the edits do something: the edited rows differ from the native ones somewhere
    native = generate_rows(model, prompts, max_new_tokens=6, watch=watch)
    assert not torch.allclose(native.watch_logp, batched.watch_logp, equal_nan=True)


def naive_generation(model, prompt, edits, pushes, n_new):
    """Greedy decoding by re-running the whole sequence at every step, with each edit's matrix computed by the
    readable formula from the native write factors of that run, added by ``interventions.add_to_state``."""
    seq = prompt.clone()
    for _ in range(n_new):
        names = [f"blocks.{e.layer}.mixer.hook_write_{n}" for e in edits for n in ("k", "v", "beta")]
        _, cache = model.run_with_cache(seq[None], names_filter=names)
        hooks = []
        for e in edits:
            if e.position < len(seq):
                k, v, beta = (cache[f"blocks.{e.layer}.mixer.hook_write_{n}"][0, e.position, e.head]
                              for n in ("k", "v", "beta"))
                matrix = reference_edit_matrix(e, k, v, float(beta))
                hooks += iv.add_to_state(e.layer, [(0, e.position, e.head)], matrix)
        for p in pushes:
            cells = [(0, t, p.head) for t in range(len(prompt), len(seq))]
            if cells:
                hooks += iv.add_to_state(p.layer, cells, p.matrix)
        logits = model.run_with_hooks(seq[None], fwd_hooks=hooks)[0, -1]
        seq = torch.cat([seq, logits.argmax()[None]])
    return seq[len(prompt):]


def test_each_row_equals_the_naive_reference(model):
    prompts, edits, pushes = prompts_and_edits(model, seed=1)
    result = generate_rows(model, prompts, max_new_tokens=5, edits=edits, pushes=pushes)
    for row, prompt in enumerate(prompts):
        push = [p for p in pushes if p.row == row]
        assert naive_generation(model, prompt, alone(edits, row), push, 5).tolist() == result.tokens[row].tolist()


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    prompts, edits, pushes = prompts_and_edits(model, seed=2)
    seeds = [11, 12, 13, 14, 15]
    batched = generate_rows(model, prompts, max_new_tokens=8, edits=edits, pushes=pushes, do_sample=True,
                            temperature=1.5, seeds=seeds, batch_size=2)
    for row, prompt in enumerate(prompts):
        push = [Push(0, p.layer, p.head, p.matrix) for p in pushes if p.row == row]
        one = generate_rows(model, [prompt], max_new_tokens=8, edits=alone(edits, row), pushes=push, do_sample=True,
                            temperature=1.5, seeds=[seeds[row]])
        assert batched.tokens[row].tolist() == one.tokens[0].tolist()
    other = generate_rows(model, prompts, max_new_tokens=8, do_sample=True, temperature=1.5, seeds=[1, 2, 3, 4, 5])
    again = generate_rows(model, prompts, max_new_tokens=8, do_sample=True, temperature=1.5, seeds=[1, 2, 3, 4, 5])
    assert other.tokens.tolist() == again.tokens.tolist()
    assert other.tokens.tolist() != batched.tokens.tolist()


def test_edit_matrices_equal_the_readable_formula():
    generator = torch.Generator().manual_seed(0)
    d_k, d_v, n = 5, 7, 6
    k, v = torch.randn(n, d_k, generator=generator), torch.randn(n, d_v, generator=generator)
    beta = torch.rand(n, generator=generator) + 0.1
    beta[2] = -0.4  # a negative strength: the value side keeps its sign
    edits = [CacheEdit(0, 0, 0, 0, value=torch.randn(d_v, generator=generator), scale=3.0, relative=True),
             CacheEdit(0, 0, 0, 0, scale=-1.0, relative=True),
             CacheEdit(0, 0, 0, 0, scale=-1.0, relative=True),
             CacheEdit(0, 0, 0, 0, key=torch.randn(d_k, generator=generator),
                       value=torch.randn(d_v, generator=generator), scale=0.5),
             CacheEdit(0, 0, 0, 0, key=torch.randn(d_k, generator=generator), scale=2.0, relative=True),
             CacheEdit(0, 0, 0, 0, value=torch.randn(d_v, generator=generator), scale=1.5)]
    got = edit_matrices(**stacked(edits, d_k, d_v), native_k=k, native_v=v, native_beta=beta)
    for i, e in enumerate(edits):
        assert torch.allclose(got[i], reference_edit_matrix(e, k[i], v[i], float(beta[i])), atol=1e-6)
    # deleting is minus the native write, and the install has m times its Frobenius norm
    for i in (1, 2):
        assert torch.allclose(got[i], -beta[i] * torch.outer(k[i], v[i]), atol=1e-6)
    write_norm = (beta[0] * torch.outer(k[0], v[0])).norm()
    assert torch.allclose(got[0].norm(), 3.0 * write_norm * edits[0].value.norm(), rtol=1e-5)


@pytest.mark.parametrize("edit,match", [
    (CacheEdit(0, 11, 0, 0, scale=1.0), "past what is generated"),  # prompt of 8, 5 new: 0..10 can act
    (CacheEdit(0, 2, 0, 0, scale=float("nan")), "finite"),
    (CacheEdit(0, 2, 0, 99, scale=1.0), "head 99"),
    (CacheEdit(0, 2, 99, 0, scale=1.0), "not a recurrent layer"),
    (CacheEdit(5, 2, 0, 0, scale=1.0), "row 5"),
    (CacheEdit(0, 2, 0, 0, value=torch.ones(3), scale=1.0), "must be a"),
])
def test_bad_edits_are_clear_errors(model, edit, match):
    layer = recurrent_layers(model)[0]
    edit = CacheEdit(**{**edit.__dict__, "layer": layer if edit.layer == 0 else edit.layer})
    with pytest.raises(ValueError, match=match):
        generate_rows(model, [torch.arange(8)], max_new_tokens=5, edits=[edit])


def test_sampling_needs_one_seed_per_row(model):
    with pytest.raises(ValueError, match="one seed per row"):
        generate_rows(model, [torch.arange(4)] * 2, max_new_tokens=2, do_sample=True, seeds=[1])


def test_the_last_accepted_edit_position_reaches_the_last_generated_token(model):
    """Prompt of 8, 5 new tokens: the edit after the read at 10 (the fourth generated token) changes the
    distribution the fifth is drawn from, and nothing before it."""
    layer = recurrent_layers(model)[0]
    watch = torch.tensor([[0, 1, 2]])
    native = generate_rows(model, [torch.arange(8)], max_new_tokens=5, watch=watch)
    generator = torch.Generator().manual_seed(0)  # not a constant value side: RWKV-7's per-head GroupNorm removes it
    edit = CacheEdit(0, 10, layer, 0, value=torch.randn(model.cfg.d_v, generator=generator),
                     key=torch.randn(model.cfg.d_k, generator=generator), scale=50.0)
    edited = generate_rows(model, [torch.arange(8)], max_new_tokens=5, edits=[edit], watch=watch)
    assert edited.tokens[0, :4].tolist() == native.tokens[0, :4].tolist()
    assert torch.equal(edited.watch_logp[0, :4], native.watch_logp[0, :4])
    assert not torch.allclose(edited.watch_logp[0, 4], native.watch_logp[0, 4])
