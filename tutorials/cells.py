"""Helpers shared by every tutorial notebook's builder: markdown and code cells, the setup cell, the head rule."""

from __future__ import annotations

from nbformat.v4 import new_code_cell, new_markdown_cell

KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


def setup_cell(imports: str, no_grad: bool = False) -> str:
    """The first code cell of every notebook: quiet warnings, the notebook's imports, threads, the output folder."""
    grad = "torch.set_grad_enabled(False)  # we only run the model in this notebook: no gradients\n" if no_grad else ""
    return f'''
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")          # tqdm's notebook bar wants ipywidgets
warnings.filterwarnings("ignore", category=UserWarning, module="sae_lens")  # SAELens' notes about tiny datasets

{imports.strip()}

torch.set_num_threads(1)  # the model is tiny: one thread is fast, and polite on a shared machine
{grad}
# Figures and SAEs go to a scratch folder; set WRITESAE_TUTORIAL_OUT to keep them somewhere else.
OUT = Path(os.environ.get("WRITESAE_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="writesae-tutorial-"))
OUT.mkdir(parents=True, exist_ok=True)
print("output folder:", OUT)
'''


# The head-choosing rule shared by the three notebooks (it is explained in notebook 01).
PICK_HEAD = '''
def head_memory(model, tokens):
    """Median of a_t = exp(decay_t) per (recurrent layer, head): how much of the state survives one step."""
    names = [f"blocks.{layer}.mixer.hook_decay" for layer in model.cfg.recurrent_layers]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    table = {f"head {h}": [cache[n][:, :, h].exp().median().item() for n in names] for h in range(model.cfg.n_heads)}
    return pd.DataFrame(table, index=pd.Index(model.cfg.recurrent_layers, name="layer"))
'''
