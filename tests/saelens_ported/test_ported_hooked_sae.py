"""SAELens' analysis tests (tests/analysis/test_hooked_sae.py, test_hooked_sae_transformer.py) for WriteSAEs, spliced by
SAELens' own HookedSAETransformer into a tiny random TransformerLens model whose residual stream has d_model =
d_k * d_v, so a WriteSAE reads it as a [d_k, d_v] matrix.

Covered: the SAE's forward reconstructs its input, run_with_cache names, run_with_hooks, add_sae / reset_saes /
run_with_saes / run_with_cache_with_saes, and the error term (outputs equal the model without SAEs, and gradients
through the spliced model equal the clean model's, which needs the decode path to give every latent its gradient).
Not ported: the Neuronpedia and pretrained-release tests (network) and hook_z splices (no head axis here).
"""

import pytest
import torch
from sae_lens import HookedSAETransformer
from transformer_lens import HookedTransformerConfig

from ported_saes import D_IN, D_SAE, inference_sae

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=2, d_model=D_IN, d_head=6, n_heads=4, d_mlp=32, d_vocab=40, n_ctx=8,
                                  act_fn="relu", normalization_type="LN", seed=0)
    return HookedSAETransformer(cfg)


@pytest.fixture
def sae(inference_variant):
    sae = inference_sae(inference_variant)
    sae.cfg.metadata.hook_name = HOOK
    return sae


TOKENS = torch.tensor([[1, 5, 7, 2, 9, 3], [4, 4, 8, 1, 0, 6]])


def test_sae_forward_reconstructs_with_its_own_decode(model, sae):
    _, cache = model.run_with_cache(TOKENS, names_filter=HOOK)
    x = cache[HOOK]
    torch.testing.assert_close(sae(x), sae.decode(sae.encode(x)))


def test_run_with_cache_with_saes_names_the_sae_hooks(model, sae):
    logits, cache = model.run_with_cache_with_saes(TOKENS, saes=[sae])
    for name in ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_output"):
        assert f"{HOOK}.{name}" in cache
    assert cache[f"{HOOK}.hook_sae_acts_post"].shape == (*TOKENS.shape, D_SAE)
    assert model.acts_to_saes == {}  # the SAE was removed again


def test_run_with_saes_changes_the_output_and_reset_restores_it(model, sae):
    clean = model(TOKENS)
    spliced = model.run_with_saes(TOKENS, saes=[sae])
    assert not torch.allclose(spliced, clean)
    model.add_sae(sae)
    torch.testing.assert_close(model(TOKENS), spliced)
    model.reset_saes()
    torch.testing.assert_close(model(TOKENS), clean)


def test_run_with_hooks_on_sae_latents(model, sae):
    """Zeroing every latent through a hook on hook_sae_acts_post leaves only the decoder bias."""
    seen = {}

    def zero(acts, hook):
        return torch.zeros_like(acts)

    def grab(x, hook):
        seen["recons"] = x

    model.add_sae(sae)
    try:
        model.run_with_hooks(TOKENS, fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", zero),
                                                (f"{HOOK}.hook_sae_recons", grab)])
    finally:
        model.reset_saes()
    torch.testing.assert_close(seen["recons"], sae.b_dec.expand_as(seen["recons"]))


def test_error_term_gives_the_clean_model_outputs(model, sae):
    clean = model(TOKENS)
    model.add_sae(sae, use_error_term=True)
    try:
        spliced = model(TOKENS)
    finally:
        model.reset_saes()
    torch.testing.assert_close(spliced, clean, rtol=1e-5, atol=1e-5)


def test_feature_gradients_with_the_error_term(model, sae):
    """SAELens (test_hooked_sae.py, error-term test): with the error term the SAE returns its input, and the gradient
    reaching hook_sae_acts_post is the output gradient times W_dec^T for every latent, active or not (what
    attribution patching through SAE latents relies on)."""
    _, cache = model.run_with_cache(TOKENS, names_filter=HOOK)
    x = cache[HOOK]
    sae.use_error_term = True
    grads = {}

    def keep(grad, hook):
        grads[hook.name] = grad.detach()

    sae.add_hook("hook_sae_acts_post", keep, "bwd")
    sae.add_hook("hook_sae_output", keep, "bwd")
    try:
        out = sae(x)
        torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)
        (out * torch.linspace(-1, 1, D_IN)).sum().backward()
    finally:
        sae.reset_hooks()
    expected = grads["hook_sae_output"] @ sae.W_dec.detach().T
    torch.testing.assert_close(grads["hook_sae_acts_post"], expected, rtol=1e-5, atol=1e-6)
