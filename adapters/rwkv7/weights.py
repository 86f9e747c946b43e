"""Weight conversion: fla's RWKV-7 state dict -> HookedRWKV7 parameter names, as an explicit table.

The time-mix parameters keep fla's names and shapes under ``blocks.{l}.mixer`` (``attn`` there); nothing is transposed.
"""

from __future__ import annotations

from writesae_lens.hooking.loading import rename_with_table

_LAYER = r"model\.layers\.(?P<l>\d+)"
RENAMES: list[tuple[str, str]] = [
    (r"model\.embeddings\.weight", "embed.W_E"),
    (r"model\.layers\.0\.pre_norm\.(?P<p>weight|bias)", "embed.ln0.{p}"),
    (r"model\.norm\.(?P<p>weight|bias)", "ln_final.{p}"),
    (r"lm_head\.weight", "unembed.weight"),
    (_LAYER + r"\.attn_norm\.(?P<p>weight|bias)", "blocks.{l}.ln1.{p}"),
    (_LAYER + r"\.ffn_norm\.(?P<p>weight|bias)", "blocks.{l}.ln2.{p}"),
    (_LAYER + r"\.attn\.(?P<rest>.+)", "blocks.{l}.mixer.{rest}"),
    (_LAYER + r"\.ffn\.(?P<rest>x_k|key\.weight|value\.weight)", "blocks.{l}.mlp.{rest}"),
]

our_name = rename_with_table(RENAMES)
