"""Weight conversion: transformers' Qwen3.5 state dict -> HookedQwen35 parameter names, as an explicit table.

Every checkpoint key is matched by one rule of ``RENAMES`` (a regular expression on the transformers name and the
name of our parameter); shapes are checked one by one, and missing or unexpected keys are errors listing them.
The multimodal wrapper's text weights live under ``model.language_model.``; its vision tower (``model.visual.``) and
the multi-token-prediction head (``mtp.``) are ignored, as transformers' own text model ignores them.
"""

from __future__ import annotations

from writesae_lens.hooking.loading import rename_with_table

# (transformers key pattern, our parameter name); {l} is the layer index.
RENAMES: list[tuple[str, str]] = [
    (r"model\.embed_tokens\.weight", "embed.W_E"),
    (r"model\.norm\.weight", "ln_final.w"),
    (r"lm_head\.weight", "unembed.weight"),
    (r"model\.layers\.(?P<l>\d+)\.input_layernorm\.weight", "blocks.{l}.ln1.w"),
    (r"model\.layers\.(?P<l>\d+)\.post_attention_layernorm\.weight", "blocks.{l}.ln2.w"),
    (r"model\.layers\.(?P<l>\d+)\.mlp\.(?P<m>gate_proj|up_proj|down_proj)\.weight", "blocks.{l}.mlp.{m}.weight"),
    # Gated DeltaNet
    (r"model\.layers\.(?P<l>\d+)\.linear_attn\.(?P<m>in_proj_qkv|in_proj_z|in_proj_b|in_proj_a|out_proj|conv1d)\.weight",
     "blocks.{l}.mixer.{m}.weight"),
    (r"model\.layers\.(?P<l>\d+)\.linear_attn\.(?P<m>dt_bias|A_log)", "blocks.{l}.mixer.{m}"),
    (r"model\.layers\.(?P<l>\d+)\.linear_attn\.norm\.weight", "blocks.{l}.mixer.norm_w"),
    # gated full attention
    (r"model\.layers\.(?P<l>\d+)\.self_attn\.(?P<m>q_proj|k_proj|v_proj|o_proj)\.weight", "blocks.{l}.attn.{m}.weight"),
    (r"model\.layers\.(?P<l>\d+)\.self_attn\.(?P<m>q_norm|k_norm)\.weight", "blocks.{l}.attn.{m}.w"),
]
IGNORED_PREFIXES = ("model.visual.", "mtp.")
_rename = rename_with_table(RENAMES)
MULTIMODAL_TEXT_PREFIX = "model.language_model."


def our_name(hf_key: str) -> str | None:
    """Our parameter name for a transformers key (None if the key is ignored); KeyError if no rule matches."""
    if hf_key.startswith(MULTIMODAL_TEXT_PREFIX):
        hf_key = "model." + hf_key[len(MULTIMODAL_TEXT_PREFIX):]
    if hf_key.startswith(IGNORED_PREFIXES):
        return None
    return _rename(hf_key)
