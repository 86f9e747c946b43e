"""SAEs spliced into the hooked models (``add_sae``, ``run_with_saes``, ...), see docs/splicing.md."""

from writesae_lens.splicing.mixin import STATE_MODES, HookedSAEMixin, with_sae_splicing
from writesae_lens.splicing.spliced_sae import SPLICE_HOOK_NAMES, SplicedSAE

__all__ = ["STATE_MODES", "SPLICE_HOOK_NAMES", "HookedSAEMixin", "SplicedSAE", "with_sae_splicing"]
