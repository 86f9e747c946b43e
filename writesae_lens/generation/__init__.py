"""Cache edits that steer generation (paper section 6): one batched generation engine with per-row edits, and the
protocols built on it (the three-position install, single-atom erasure, the amplification probe)."""

from .directions import head_output_block, target_directions, value_directions
from .edits import CacheEdit, Push, edit_matrices, reference_edit_matrix
from .engine import GenerationResult, generate_rows

__all__ = ["CacheEdit", "GenerationResult", "Push", "edit_matrices", "generate_rows", "head_output_block",
           "reference_edit_matrix", "target_directions", "value_directions"]
