"""Pure tensor math of the factored ("write-shaped") dictionary shared by every WriteSAE.

An atom is a d_k x d_v matrix built from R pairs of factors,

    A_i = sum_{r < R} p_{i,r} q_{i,r}^T,   p_{i,r} in R^{d_k} (key side),  q_{i,r} in R^{d_v} (value side),

shaped like the native write k v^T of a linear-attention layer. States and atoms are flattened
row-major with the key axis first, flat[a * d_v + b] = M[a, b]; this is how the hooked model
hands one head's state ([d_k, d_v]) to SAELens.

Nothing here owns parameters: every function takes the factor tensors it needs. The readable
formula-by-formula versions live in `reference.py`; tests check these against them.
"""


import torch
from jaxtyping import Float, Int
from torch import Tensor

# Decode from the gathered active atoms while active atoms per row (times rank) stay below this
# fraction of the dictionary; above it a dense product with the materialised atoms is cheaper.
SPARSE_DECODE_MAX_ACTIVE_FRACTION = 0.25


def states_as_matrices(
    flat_states: Float[Tensor, "*batch d_in"], d_k: int, d_v: int
) -> Float[Tensor, "*batch d_k d_v"]:
    """View flattened states as [..., d_k, d_v] matrices (key axis first)."""
    return flat_states.unflatten(-1, (d_k, d_v))


def matrices_as_states(matrices: Float[Tensor, "*batch d_k d_v"]) -> Float[Tensor, "*batch d_in"]:
    """Flatten [..., d_k, d_v] matrices row-major to [..., d_k * d_v]."""
    return matrices.flatten(-2, -1)


def materialize_atoms(
    key_factors: Float[Tensor, "d_sae rank d_k"],
    value_factors: Float[Tensor, "d_sae rank d_v"],
) -> Float[Tensor, "d_sae d_k d_v"]:
    """Every atom as a full matrix, A_i = sum_r p_{i,r} q_{i,r}^T = P_i^T Q_i (one batched GEMM)."""
    return torch.bmm(key_factors.transpose(1, 2), value_factors)


def bilinear_filters(
    key_factors: Float[Tensor, "d_sae rank d_k"],
    value_factors: Float[Tensor, "d_sae rank d_v"],
) -> Float[Tensor, "d_sae d_in"]:
    """The bilinear encoder as a [d_sae, d_in] weight, one flattened matched filter per row.

    sum_r u_{i,r}^T X w_{i,r} = <vec(X), vec(sum_r u_{i,r} w_{i,r}^T)>, so applying the encoder is
    `linear(vec(X), filters)`. Building the filters once per batch costs d_sae*d_k*d_v, the same as
    contracting one state with the factors, and the encoder then runs as one large GEMM; with
    batched-GEMM filters (whose backward is also a batched GEMM) this was the fastest form
    measured on CPU, 2-5x faster than contracting each state with the factors.
    """
    return materialize_atoms(key_factors, value_factors).flatten(1, 2)


def atom_frobenius_norms(
    key_factors: Float[Tensor, "d_sae rank d_k"],
    value_factors: Float[Tensor, "d_sae rank d_v"],
) -> Float[Tensor, " d_sae"]:
    """||sum_r p_r q_r^T||_F per atom, from the factor Gram matrices (no atom is materialised).

    ||A||_F^2 = sum_{r,s} (p_r . p_s)(q_r . q_s); for rank 1 this is ||p|| * ||q||.
    """
    key_gram = torch.einsum("frk,fsk->frs", key_factors, key_factors)  # [d_sae, rank, rank]
    value_gram = torch.einsum("frv,fsv->frs", value_factors, value_factors)
    return (key_gram * value_gram).sum(dim=(1, 2)).clamp(min=0.0).sqrt()


@torch.no_grad()
def normalize_factor_rows_(factors: Float[Tensor, "d_sae rank d"], eps: float = 1e-12) -> None:
    """Rescale every factor row factors[i, r] to unit L2 norm, in place (all-zero rows stay zero)."""
    norms = factors.norm(dim=-1, keepdim=True)  # [d_sae, rank, 1]
    factors.div_(norms.clamp(min=eps))


@torch.no_grad()
def atom_factors(
    atoms: Float[Tensor, "n d_k d_v"], rank: int, atol: float = 1e-5
) -> tuple[Float[Tensor, "n rank d_k"], Float[Tensor, "n rank d_v"]]:
    """Factors (p, q) with sum_r p_r q_r^T = atom, from a truncated SVD; the singular value goes
    to the key side (value factors are unit vectors). Raises ValueError when an atom's rank
    exceeds `rank` (relative Frobenius residual above `atol`)."""
    left, singular, right_t = torch.linalg.svd(atoms.double(), full_matrices=False)
    usable = min(rank, singular.shape[-1])
    keys = atoms.new_zeros(atoms.shape[0], rank, atoms.shape[1])
    values = atoms.new_zeros(atoms.shape[0], rank, atoms.shape[2])
    keys[:, :usable] = (left[:, :, :usable] * singular[:, None, :usable]).transpose(1, 2).to(atoms.dtype)
    values[:, :usable] = right_t[:, :usable, :].to(atoms.dtype)
    residual = singular[:, usable:].pow(2).sum(-1).sqrt()
    norms = singular.pow(2).sum(-1).sqrt().clamp(min=1e-30)
    too_high = residual / norms > atol
    if bool(too_high.any()):
        worst = int(too_high.nonzero()[0])
        raise ValueError(
            f"atom {worst} (of those given) has rank above {rank}: relative residual "
            f"{float(residual[worst] / norms[worst]):.3g} after a rank-{rank} truncation. A WriteSAE "
            f"of rank {rank} can only hold atoms of rank <= {rank}."
        )
    return keys, values


def count_active_per_row(code: Float[Tensor, "n d_sae"]) -> int:
    """The largest number of non-zero latents in any row (0 for an empty batch)."""
    if code.shape[0] == 0:
        return 0
    return int((code != 0).sum(dim=-1).max().item())


def active_atoms_of_code(
    code: Float[Tensor, "n d_sae"], n_active: int
) -> tuple[Float[Tensor, "n n_active"], Int[Tensor, "n n_active"]]:
    """The n_active largest-magnitude entries of each row as (coefficients, atom indices).

    With n_active >= the number of non-zeros in every row this keeps all of them (rows with
    fewer non-zeros are padded with zero coefficients). Coefficients are gathered from `code`,
    so gradients flow back to it.
    """
    _, atom_indices = code.abs().topk(n_active, dim=-1, sorted=False)
    return code.gather(-1, atom_indices), atom_indices


def decode_active_atoms(
    coefficients: Float[Tensor, "n n_active"],
    atom_indices: Int[Tensor, "n n_active"],
    key_factors: Float[Tensor, "d_sae rank d_k"],
    value_factors: Float[Tensor, "d_sae rank d_v"],
) -> Float[Tensor, "n d_k d_v"]:
    """sum_j c_j A_{idx_j} per row, from the gathered factors of the active atoms only.

    Cost per row: n_active * rank * d_k * d_v multiply-adds, as one batched
    [d_k, n_active*rank] x [n_active*rank, d_v] product. No [d_sae, d_k*d_v] tensor is built.
    """
    n_rows, n_active = atom_indices.shape
    rank, d_k, d_v = key_factors.shape[1], key_factors.shape[2], value_factors.shape[2]
    # index_select, not key_factors[atom_indices]: its backward (index_add) is deterministic on CPU, where the
    # accumulating index_put of advanced indexing sums repeated atoms in a thread-dependent order
    flat = atom_indices.flatten()
    active_keys = key_factors.index_select(0, flat).view(n_rows, n_active, rank, d_k)
    active_values = value_factors.index_select(0, flat).view(n_rows, n_active, rank, d_v)
    scaled_keys = active_keys * coefficients[:, :, None, None].to(active_keys.dtype)
    scaled_keys = scaled_keys.reshape(n_rows, n_active * rank, d_k)
    active_values = active_values.reshape(n_rows, n_active * rank, d_v)
    return torch.bmm(scaled_keys.transpose(1, 2), active_values)  # [n, d_k, d_v]


class _SparseFactoredDecode(torch.autograd.Function):
    """sum_j c_j A_{idx_j} from the gathered active atoms, with the gradient of the full dense product.

    Forward touches only the active atoms. Backward returns the factors' gradients (only active atoms
    have non-zero ones, exactly as in the dense product) and d out / d code for *every* latent,
    <G_n, A_i> = sum_r p_{i,r}^T G_n q_{i,r}, so the gradient does not depend on the decode path
    (inactive latents matter for JumpReLU thresholds, attribution and error-term gradients).
    With `active_code_gradient_only` the code's gradient is formed on the active entries alone
    (zero elsewhere); that is exact for callers whose code came out of a TopK / BatchTopK
    selection, whose backward reads only those entries.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        code: Tensor,
        atom_indices: Tensor,
        key_factors: Tensor,
        value_factors: Tensor,
        active_code_gradient_only: bool,
    ) -> Tensor:
        coefficients = code.gather(-1, atom_indices)
        return decode_active_atoms(coefficients, atom_indices, key_factors, value_factors)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        code, atom_indices, key_factors, value_factors, active_only = inputs
        ctx.save_for_backward(code.gather(-1, atom_indices), atom_indices, key_factors, value_factors)
        ctx.active_only = active_only
        ctx.code_dtype = code.dtype
        ctx.d_sae = code.shape[-1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        coefficients, atom_indices, key_factors, value_factors = ctx.saved_tensors
        n_rows, n_active = atom_indices.shape
        d_sae, rank, d_k = key_factors.shape
        d_v = value_factors.shape[2]
        grad_out = grad_out.to(key_factors.dtype)  # [n, d_k, d_v]
        flat = atom_indices.flatten()
        active_keys = key_factors.index_select(0, flat).view(n_rows, n_active * rank, d_k)
        active_values = value_factors.index_select(0, flat).view(n_rows, n_active * rank, d_v)
        # G q and G^T p for every active (atom, rank) pair: [n, n_active * rank, d_k] / [..., d_v]
        g_values = torch.bmm(active_values, grad_out.transpose(1, 2))
        g_keys = torch.bmm(active_keys, grad_out)
        grad_code = grad_keys = grad_values = None
        if ctx.needs_input_grad[0]:
            if ctx.active_only:
                per_active = (g_values * active_keys).sum(-1).view(n_rows, n_active, rank).sum(-1)
                grad_code = per_active.new_zeros(n_rows, ctx.d_sae).scatter(-1, atom_indices, per_active)
            else:  # every latent: linear(vec(G), atoms), one GEMM against the materialised atoms
                atoms = bilinear_filters(key_factors, value_factors)  # [d_sae, d_in]
                grad_code = grad_out.flatten(1) @ atoms.T  # [n, d_sae]
            grad_code = grad_code.to(ctx.code_dtype)
        scale = coefficients.to(key_factors.dtype).repeat_interleave(rank, dim=1)[:, :, None]
        if ctx.needs_input_grad[2]:
            contributions = (g_values * scale).reshape(n_rows * n_active, rank, d_k)
            grad_keys = torch.zeros_like(key_factors).index_add_(0, flat, contributions)
        if ctx.needs_input_grad[3]:
            contributions = (g_keys * scale).reshape(n_rows * n_active, rank, d_v)
            grad_values = torch.zeros_like(value_factors).index_add_(0, flat, contributions)
        return grad_code, None, grad_keys, grad_values, None


def decode_code(
    code: Float[Tensor, "n d_sae"],
    key_factors: Float[Tensor, "d_sae rank d_k"],
    value_factors: Float[Tensor, "d_sae rank d_v"],
    max_active_fraction: float = SPARSE_DECODE_MAX_ACTIVE_FRACTION,
    active_code_gradient_only: bool = False,
) -> Float[Tensor, "n d_k d_v"]:
    """sum_i code[n, i] A_i for a dense-layout code, without the decoder bias.

    TopK codes have at most k non-zeros per row, so this gathers the active atoms and runs
    `decode_active_atoms`. A code dense enough that the gathered factors would cost more than
    the atoms themselves (a JumpReLU SAE at high L0, or the dead-latent auxiliary code) goes
    through the materialised atoms instead; both paths give the same sum and the same gradients
    (those of `code @ W_dec`, for every latent; see `_SparseFactoredDecode`).
    `active_code_gradient_only=True` limits the code's gradient to its non-zero entries on the
    sparse path, which is exact when the code is the output of a TopK-style selection.
    """
    n_rows, d_sae = code.shape
    rank, d_k, d_v = key_factors.shape[1], key_factors.shape[2], value_factors.shape[2]
    n_active = count_active_per_row(code)
    if n_active * rank > max_active_fraction * d_sae:
        atoms = materialize_atoms(key_factors, value_factors).flatten(1, 2)  # [d_sae, d_in]
        return (code.to(atoms.dtype) @ atoms).unflatten(-1, (d_k, d_v))
    if n_active == 0 and not (torch.is_grad_enabled() and code.requires_grad):
        return code.new_zeros(n_rows, d_k, d_v, dtype=key_factors.dtype)
    n_active = max(n_active, 1)  # an all-zero code still carries d out / d code
    _, atom_indices = active_atoms_of_code(code.detach(), n_active)
    return _SparseFactoredDecode.apply(code, atom_indices, key_factors, value_factors, active_code_gradient_only)
