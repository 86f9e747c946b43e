"""The passages a substitution test runs on, from whatever form the user holds them in.

Every passage must have the same number of tokens and hold only real tokens: a recurrent state runs through every
position, so padding would be read as text (and its firings tested). Accepted:

- a token tensor ``[n_passages, n_pos]`` (or one passage ``[n_pos]``);
- a list of token tensors, each a batch ``[b, n_pos]`` or one passage ``[n_pos]``;
- a ``datasets.Dataset`` (or anything with ``column_names`` and column access) with a ``tokens`` or ``input_ids``
  column, as SAELens' pretokenized datasets have;
- a string or a list of strings, tokenised without special tokens.

To cut long text into equal passages use ``writesae_lens.pipeline.token_passages(model, texts, n_passages, n_pos)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

TOKEN_COLUMNS = ("tokens", "input_ids")


def as_passages(model, data) -> Tensor:
    """``data`` as one token tensor ``[n_passages, n_pos]`` on the model's device (clear errors otherwise)."""
    if isinstance(data, Tensor):
        return model._as_tokens(data, prepend_bos=False)
    if isinstance(data, str):
        data = [data]
    if hasattr(data, "column_names"):
        column = next((name for name in TOKEN_COLUMNS if name in data.column_names), None)
        if column is None:
            raise ValueError(f"a dataset of passages needs a column of token ids named one of {TOKEN_COLUMNS}; this "
                             f"one has {list(data.column_names)}")
        rows = [torch.as_tensor(row) for row in data[column]]
    elif isinstance(data, (list, tuple)) and data and all(isinstance(x, str) for x in data):
        tokenizer = model.tokenizer
        if tokenizer is None:
            raise ValueError("passages given as text need the model's tokenizer, and this model has none")
        rows = [torch.tensor(tokenizer.encode(text, add_special_tokens=False)) for text in data]
    elif isinstance(data, (list, tuple)) and data and all(isinstance(x, Tensor) for x in data):
        rows = [row for batch in data for row in (batch if batch.dim() == 2 else batch[None])]
    else:
        raise TypeError("passages must be a token tensor [n_passages, n_pos], a list of token tensors, a dataset with "
                        f"a {' or '.join(TOKEN_COLUMNS)} column, or text; got {type(data).__name__}")
    if not rows:
        raise ValueError("no passages given")
    lengths = sorted({len(row) for row in rows})
    if len(lengths) > 1:
        raise ValueError(f"every passage must have the same number of tokens (padding would be read as text by the "
                         f"recurrent layers); got lengths {lengths[:4]}{'...' if len(lengths) > 4 else ''}. Cut text "
                         "into equal passages with writesae_lens.pipeline.token_passages(model, texts, n_passages, "
                         "n_pos)")
    return model._as_tokens(torch.stack(rows), prepend_bos=False)
