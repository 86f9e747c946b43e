"""Weight conversion: transformers' Mamba-2 state dict -> HookedMamba2 parameter names, as an explicit table.

Every checkpoint key is matched by one rule of ``RENAMES``; no tensor is transposed or reshaped (the depthwise conv
kernel keeps transformers' ``[conv_dim, 1, kernel]``). Shapes are checked one by one, and missing or unexpected keys
are errors listing them. ``lm_head.weight`` may be absent when the embeddings are tied.
"""

from __future__ import annotations

from writesae_lens.hooking.loading import rename_with_table

_LAYER = r"backbone\.layers\.(?P<l>\d+)"
# (transformers key pattern, our parameter name); named groups fill the placeholders.
RENAMES: list[tuple[str, str]] = [
    (r"backbone\.embeddings?\.weight", "embed.W_E"),  # older checkpoints say `embedding` (transformers renames it)
    (r"backbone\.norm_f\.weight", "ln_final.w"),
    (r"lm_head\.weight", "unembed.weight"),
    (_LAYER + r"\.norm\.weight", "blocks.{l}.ln1.w"),
    (_LAYER + r"\.mixer\.(?P<m>in_proj|out_proj|conv1d)\.(?P<p>weight|bias)", "blocks.{l}.mixer.{m}.{p}"),
    (_LAYER + r"\.mixer\.(?P<m>dt_bias|A_log|D)", "blocks.{l}.mixer.{m}"),
    (_LAYER + r"\.mixer\.norm\.weight", "blocks.{l}.mixer.norm_w"),
]


our_name = rename_with_table(RENAMES)
