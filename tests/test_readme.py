"""README's first example runs as written (on the shipped tiny model)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    text = README.read_text(encoding="utf-8")
    example = text.split("## Example", 1)[1]
    code = re.search(r"```python\n(.*?)```", example, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["S"].shape[-1] == namespace["d_k"] * namespace["d_v"]
    assert not torch.allclose(namespace["edited"], namespace["logits"])
    assert torch.allclose(namespace["edited"][:, :5], namespace["logits"][:, :5], atol=1e-5)
    assert isinstance(namespace["text"], str) and "Once upon a time" in namespace["text"]
