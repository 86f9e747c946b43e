"""Pure tensor math: the matrix recurrences and the propagation of state edits (no modules, no hooks)."""
