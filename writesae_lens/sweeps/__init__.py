"""Sweeps: many (layer, head) cells x seeds x variants trained from one activation stream, evaluated, tabulated.

- ``stream``: the shared activation stream and the lockstep training of SAELens trainers (one model pass per batch).
- ``config``: the sweep config file and its checks.
- ``layout``: the output folder (resumable: a cell is finished when its folder is in place, never half-written).
- ``results``: the results table (CSV, Parquet) and the layer x head heatmaps of the win rate.
- ``distributed``: the cells split across ``torchrun`` ranks (torch.distributed, gloo or NCCL).
- ``run``: the whole sweep, as ``writesae sweep`` runs it.

See docs/sweeps.md.
"""
