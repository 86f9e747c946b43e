"""The activation names a full ``run_with_cache`` gives, in the order the forward pass reaches them.

Mirrors TransformerLens' tests/integration/test_cache_hook_names.py: there, one GPT-style block's names; here the
names of a recurrent block of each family and of Qwen3.5's attention block, as docs/hooks.md lists them. The sparse
edit hooks (``hook_write_add``, ``hook_post_read_add``) carry no activation and are never cached.
"""

import torch

from tl_helpers import random_tokens

RECURRENT_MIXER = ["hook_write_k", "hook_write_v", "hook_write_beta", "hook_decay", "hook_read_q", "hook_state",
                   "hook_read"]
EXPECTED_BLOCK = {
    "HookedQwen35": ["hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized",
                     *[f"mixer.{n}" for n in RECURRENT_MIXER], "mixer.hook_gate", "hook_mixer_out", "hook_resid_mid",
                     "ln2.hook_scale", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post",
                     "hook_mlp_out", "hook_resid_post"],
    "HookedMamba2": ["hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized",
                     *[f"mixer.{n}" for n in RECURRENT_MIXER], "mixer.hook_skip", "mixer.hook_ssm_out",
                     "mixer.hook_gate", "hook_mixer_out", "hook_resid_post"],
    "HookedRWKV7": ["hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "mixer.hook_write_k",
                    "mixer.hook_write_v", "mixer.hook_write_beta", "mixer.hook_decay", "mixer.hook_erase_a",
                    "mixer.hook_erase_b", "mixer.hook_read_q", "mixer.hook_state", "mixer.hook_read",
                    "mixer.hook_bonus", "mixer.hook_gate", "hook_mixer_out", "hook_resid_mid", "ln2.hook_scale",
                    "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post"],
}
QWEN_ATTENTION_BLOCK = ["hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "attn.q_norm.hook_scale",
                        "attn.q_norm.hook_normalized", "attn.hook_q", "attn.k_norm.hook_scale",
                        "attn.k_norm.hook_normalized", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q",
                        "attn.hook_rot_k", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z",
                        "attn.hook_gate", "hook_attn_out", "hook_resid_mid", "ln2.hook_scale", "ln2.hook_normalized",
                        "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post", "hook_mlp_out", "hook_resid_post"]


def test_cache_hook_names(model):
    with torch.no_grad():
        _, cache = model.run_with_cache(random_tokens(model, n_pos=4))
    family = type(model).__name__
    expected = ["embed.ln0.hook_scale", "embed.ln0.hook_normalized"] if family == "HookedRWKV7" else []
    expected.append("hook_embed")
    for layer in range(model.cfg.n_layers):
        names = QWEN_ATTENTION_BLOCK if layer in model.cfg.attention_layers else EXPECTED_BLOCK[family]
        if family == "HookedRWKV7" and layer == 0:  # layer 0 defines the v-first stream the later layers read
            names = names[:3] + ["mixer.hook_v_first"] + names[3:]
        expected += [f"blocks.{layer}.{name}" for name in names]
    expected += ["ln_final.hook_scale", "ln_final.hook_normalized"]
    assert list(cache.keys()) == expected
    assert not any(key.endswith(("hook_write_add", "hook_post_read_add")) for key in cache.keys())
