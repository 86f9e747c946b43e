"""Machinery shared by every WriteSAE class, mixed in front of SAELens' `SAE` / `TrainingSAE`.

Parameters (d_sae = F latents, rank R):
    W_dec_key   [F, R, d_k]  key-side decoder factors p_{i,r}   (paper code: V_dec)
    W_dec_value [F, R, d_v]  value-side decoder factors q_{i,r} (paper code: W_dec)
    b_dec       [d_in]       decoder bias, the row-major flattening of a [d_k, d_v] matrix
    b_enc       [F]
    encoder, by cfg.encoder_kind / cfg.tied:
        bilinear, untied: W_enc_key [F, R, d_k], W_enc_value [F, R, d_v]
        bilinear, tied:   none (the decoder factors are used)
        dense:            W_enc_dense [d_in, F]

`W_enc` ([d_in, F]) and `W_dec` ([F, d_in]) are properties that materialise the dense
equivalents for tools that read them (SAELens evals, dashboards). Decoding never uses `W_dec`
while codes are sparse; it gathers the factors of the active atoms (`factored.decode_code`).
A write into a materialised `W_dec` / `W_enc` could not reach the factors: it is detected at the
SAE's next use and raises `MaterialisedWriteError` (see `materialised.py`).
"""

from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from writesae_lens.ops.finite import all_finite
from writesae_lens.saes import factored, materialised
from writesae_lens.saes.saving import write_folder_atomically


class WriteSAEBase:
    """Factored-dictionary parameters, encoder pre-activations, sparse decoding, folds, saving.

    Concrete classes list this first among their bases, e.g.
    `class WriteTopKSAE(WriteSAEBase, SAE[WriteTopKSAEConfig])`, so these methods replace the
    dense-W_dec ones of SAELens' base class.
    """

    cfg: Any
    # True only inside a TopK-family training step: the code's gradient is then needed on active
    # entries only (TopK's backward reads nothing else), which spares one [n, d_in] x [d_in, d_sae] GEMM
    _active_code_gradient_only: bool = False
    b_enc: nn.Parameter
    b_dec: nn.Parameter
    W_dec_key: nn.Parameter
    W_dec_value: nn.Parameter

    # ---- parameters -------------------------------------------------------------------------

    def initialize_weights(self) -> None:
        """Unit-norm random factors (encoder starts equal to the decoder), zero biases."""
        cfg = self.cfg
        dtype, device = self.dtype, self.device
        key_factors = torch.randn(cfg.d_sae, cfg.rank, cfg.d_k, dtype=dtype, device=device)
        value_factors = torch.randn(cfg.d_sae, cfg.rank, cfg.d_v, dtype=dtype, device=device)
        factored.normalize_factor_rows_(key_factors)
        factored.normalize_factor_rows_(value_factors)
        self.W_dec_key = nn.Parameter(key_factors)
        self.W_dec_value = nn.Parameter(value_factors)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype, device=device))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype, device=device))
        if cfg.encoder_kind == "dense":
            filters = factored.bilinear_filters(key_factors, value_factors)  # [d_sae, d_in]
            self.W_enc_dense = nn.Parameter(filters.T.contiguous())  # [d_in, d_sae]
        elif not cfg.tied:
            self.W_enc_key = nn.Parameter(key_factors.clone())
            self.W_enc_value = nn.Parameter(value_factors.clone())

    @property
    def encoder_key_factors(self) -> Float[Tensor, "d_sae rank d_k"]:
        """Key-side encoder factors u_{i,r} (bilinear encoders only)."""
        self._require_bilinear_encoder("encoder_key_factors")
        return self.W_dec_key if self.cfg.tied else self.W_enc_key

    @property
    def encoder_value_factors(self) -> Float[Tensor, "d_sae rank d_v"]:
        """Value-side encoder factors w_{i,r} (bilinear encoders only)."""
        self._require_bilinear_encoder("encoder_value_factors")
        return self.W_dec_value if self.cfg.tied else self.W_enc_value

    @property
    def W_enc(self) -> Float[Tensor, "d_in d_sae"]:
        """The encoder as a dense [d_in, d_sae] matrix (materialised for bilinear encoders).

        For a dense encoder this is the parameter itself, and writes take effect. For a bilinear
        encoder it is rebuilt from W_enc_key / W_enc_value: edit those; a write into the returned
        tensor raises MaterialisedWriteError at the SAE's next use.
        """
        if self.cfg.encoder_kind == "dense":
            return self.W_enc_dense
        materialised.check_unmodified(self)
        return materialised.hand_out(self, "W_enc", self.encoder_weight().T)

    @W_enc.setter
    def W_enc(self, value: Any) -> None:
        if self.cfg.encoder_kind == "dense":
            raise AttributeError(materialised.assignment_message("W_enc", dense_name="W_enc_dense"))
        raise AttributeError(materialised.assignment_message("W_enc"))

    def encoder_weight(self) -> Float[Tensor, "d_sae d_in"]:
        """The encoder in nn.Linear layout: pre-activations = linear(sae_in, this, b_enc)."""
        if self.cfg.encoder_kind == "dense":
            return self.W_enc_dense.T
        return factored.bilinear_filters(self.encoder_key_factors, self.encoder_value_factors)

    @property
    def W_dec(self) -> Float[Tensor, "d_sae d_in"]:
        """Every atom flattened, [d_sae, d_in]. Materialised on each access; not used to decode.

        Differentiable (gradients reach the factors). Writes into it cannot reach the factors:
        they raise MaterialisedWriteError at the SAE's next use; edit W_dec_key / W_dec_value
        (or use `set_atoms_`).
        """
        materialised.check_unmodified(self)
        atoms = factored.materialize_atoms(self.W_dec_key, self.W_dec_value).flatten(1, 2)
        return materialised.hand_out(self, "W_dec", atoms)

    @W_dec.setter
    def W_dec(self, value: Any) -> None:
        raise AttributeError(materialised.assignment_message("W_dec"))

    @torch.no_grad()
    def set_atoms_(
        self, indices: Tensor | list[int] | int, atoms: Float[Tensor, "*n d_in"], *, atol: float = 1e-5
    ) -> None:
        """Write decoder atoms (flattened [d_k, d_v] matrices) into the factors, in place.

        Each atom is factorised by a truncated SVD of rank `cfg.rank`; an atom whose rank is
        higher than that (relative residual above `atol`) is refused, since the factored
        decoder cannot hold it. Zero atoms give zero factors.
        """
        index = torch.as_tensor(indices, dtype=torch.long, device=self.W_dec_key.device).reshape(-1)
        atoms = torch.as_tensor(atoms).to(self.W_dec_key).reshape(index.numel(), self.cfg.d_in)
        keys, values = factored.atom_factors(
            factored.states_as_matrices(atoms, self.cfg.d_k, self.cfg.d_v), self.cfg.rank, atol=atol
        )
        self.W_dec_key.data[index] = keys
        self.W_dec_value.data[index] = values

    @property
    def b_dec_matrix(self) -> Float[Tensor, "d_k d_v"]:
        """The decoder bias as a [d_k, d_v] matrix (a view of b_dec)."""
        return factored.states_as_matrices(self.b_dec, self.cfg.d_k, self.cfg.d_v)

    def atom_norms(self) -> Float[Tensor, " d_sae"]:
        """Frobenius norm of each decoder atom."""
        return factored.atom_frobenius_norms(self.W_dec_key, self.W_dec_value)

    def _require_bilinear_encoder(self, what: str) -> None:
        if self.cfg.encoder_kind != "bilinear":
            # not AttributeError: inside a property that would be masked by nn.Module.__getattr__
            raise ValueError(
                f"{what} exists only for encoder_kind='bilinear'; this SAE's encoder is "
                f"{self.cfg.encoder_kind!r} (see W_enc)."
            )

    # ---- encoding ---------------------------------------------------------------------------

    def _check_states(self, x: Tensor) -> None:
        d_in = self.cfg.d_in
        if x.shape[-1] != d_in:
            raise ValueError(
                f"WriteSAE expects one head's state flattened row-major to d_in = d_k * d_v = "
                f"{self.cfg.d_k} * {self.cfg.d_v} = {d_in} on the last axis; got a tensor of shape "
                f"{tuple(x.shape)}. Pass states shaped [..., {d_in}] (e.g. SAELens with "
                "hook_head_index on blocks.{l}.mixer.hook_state)."
            )
        if not all_finite(x):
            n_bad = int((~torch.isfinite(x)).sum().item())
            raise ValueError(
                f"WriteSAE received a state with {n_bad} non-finite entries (NaN or inf) out of "
                f"{x.numel()}; the SAE needs finite states."
            )

    def _hidden_pre(self, x: Tensor) -> Tensor:
        """Validated input -> SAELens input processing -> encoder pre-activations [..., d_sae]."""
        materialised.check_unmodified(self)
        self._check_states(x)
        sae_in = self.process_sae_in(x)  # [..., d_in]; minus b_dec if apply_b_dec_to_input
        hidden_pre = torch.nn.functional.linear(sae_in, self.encoder_weight(), self.b_enc)
        return self.hook_sae_acts_pre(hidden_pre)  # [..., d_sae]

    # ---- decoding ---------------------------------------------------------------------------

    def decode_without_bias(
        self, feature_acts: Float[Tensor, "*batch d_sae"]
    ) -> Float[Tensor, "*batch d_in"]:
        """sum_i a_i A_i, flattened, decoded from the active atoms of each row."""
        if feature_acts.shape[-1] != self.cfg.d_sae:
            raise ValueError(
                f"decode expects feature activations with d_sae = {self.cfg.d_sae} on the last "
                f"axis, got shape {tuple(feature_acts.shape)}."
            )
        materialised.check_unmodified(self)
        if feature_acts.is_sparse:
            feature_acts = feature_acts.to_dense()
        leading = feature_acts.shape[:-1]
        rows = feature_acts.reshape(-1, self.cfg.d_sae)
        matrices = factored.decode_code(  # [n, d_k, d_v]
            rows, self.W_dec_key, self.W_dec_value,
            max_active_fraction=factored.SPARSE_DECODE_MAX_ACTIVE_FRACTION,
            active_code_gradient_only=self._active_code_gradient_only,
        )
        return factored.matrices_as_states(matrices).reshape(*leading, self.cfg.d_in)

    def decode(self, feature_acts: Float[Tensor, "*batch d_sae"]) -> Float[Tensor, "*batch d_in"]:
        """Reconstruction of the flattened state, decoder bias included."""
        sae_out = self.decode_without_bias(feature_acts) + self.b_dec
        sae_out = self.hook_sae_recons(sae_out)
        sae_out = self.run_time_activation_norm_fn_out(sae_out)
        return self.reshape_fn_out(sae_out, self.d_head)

    # ---- SAELens weight folding, rewritten for factors ---------------------------------------

    @torch.no_grad()
    def get_W_dec_norm(self) -> Float[Tensor, " d_sae"]:
        return self.atom_norms().clamp(min=1e-8)

    @torch.no_grad()
    def fold_and_get_W_dec_norm(self) -> Float[Tensor, " d_sae"]:
        """Scale every atom to unit Frobenius norm and its encoder row up by the same factor."""
        if self.cfg.tied:
            raise NotImplementedError(
                "Cannot fold decoder norms into a tied WriteSAE: its encoder factors are the "
                "decoder factors."
            )
        norms = self.get_W_dec_norm()
        self.W_dec_key.data.div_(norms[:, None, None])
        if self.cfg.encoder_kind == "dense":
            self.W_enc_dense.data.mul_(norms[None, :])
        else:
            self.W_enc_key.data.mul_(norms[:, None, None])
        self.b_enc.data.mul_(norms)
        return norms

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """Absorb a constant input scaling (trained on s * x) so the SAE takes raw x."""
        if self.cfg.tied:
            raise NotImplementedError(
                "A tied WriteSAE cannot absorb an activation scaling factor (encoder and decoder "
                "share factors); train it with normalize_activations='none'."
            )
        if self.cfg.encoder_kind == "dense":
            self.W_enc_dense.data.mul_(scaling_factor)
        else:
            self.W_enc_key.data.mul_(scaling_factor)
        self.W_dec_key.data.div_(scaling_factor)
        self.b_dec.data.div_(scaling_factor)
        self.cfg.normalize_activations = "none"

    def fold_activation_whitening(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "A whitening map (d_in x d_in) cannot be folded into a factored WriteSAE dictionary; "
            "train with normalize_activations='none'."
        )

    # ---- saving -----------------------------------------------------------------------------

    def save_model(self, path: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
        """Save weights and config like SAELens, into a folder written atomically.

        An existing non-empty folder is refused unless overwrite=True, except for the
        checkpoint folders SAELens' trainer names itself (see `_saving_a_trainer_checkpoint`).
        """
        materialised.check_unmodified(self)
        overwrite = overwrite or _saving_a_trainer_checkpoint()
        return _save_atomically(super().save_model, path, overwrite)  # type: ignore[misc]

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        materialised.check_unmodified(self)
        return super().state_dict(*args, **kwargs)  # type: ignore[misc]


def _saving_a_trainer_checkpoint() -> bool:
    """True when called from SAELens' `SAETrainer.save_checkpoint`.

    The trainer writes checkpoints into folders it names itself (`checkpoint_path/<samples>`,
    `final_<samples>`) and, with its own SAEs, replaces them when a run is repeated; WriteSAEs
    follow that there. Folders the user names (`save_model(path)`, the runner's `output_path`)
    keep the no-overwrite rule.
    """
    from sae_lens.training.sae_trainer import SAETrainer

    from writesae_lens.saes.call_stack import running_frame

    return running_frame(SAETrainer.save_checkpoint.__code__, 8) is not None


def _save_atomically(save_into: Any, path: str | Path, overwrite: bool) -> tuple[Path, Path]:
    written: list[tuple[Path, Path]] = []
    target = write_folder_atomically(
        path, lambda folder: written.append(save_into(folder)), overwrite=overwrite
    )
    weights_path, cfg_path = written[0]
    return target / weights_path.name, target / cfg_path.name
