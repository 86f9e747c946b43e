"""Training-step cost of the bilinear rank-1 WriteSAE against SAELens' flat TopK SAE.

Both SAEs see the same flattened [d_k * d_v] states (sums of a few rank-1 outer products plus
noise), with the same d_sae, k, batch, learning rate and number of steps. One step is SAELens'
`training_forward_pass` + backward + Adam step. Reports per-step time (median of the timed
steps), parameter counts, and the reconstruction MSE (mean over batch and entries, as the paper
reports it) each SAE reaches on held-out states after the same number of steps.

    python bench/bench_sae_train_step.py                      # d_k = d_v = 64 and 128
    python bench/bench_sae_train_step.py --dims 128 --steps 40 --timed-steps 10 --device cuda
"""

import argparse
import statistics
import time

import torch
from sae_lens.saes.sae import TrainingSAE, TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

from writesae_lens.saes import WriteTopKTrainingSAE, WriteTopKTrainingSAEConfig


def write_shaped_states(
    n: int, d_k: int, d_v: int, n_true_atoms: int, atoms_per_state: int, noise: float, seed: int
) -> torch.Tensor:
    """[n, d_k * d_v]: sum of `atoms_per_state` unit rank-1 outer products + mean + noise."""
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.Generator().manual_seed(0)  # shared by train and held-out draws
    keys = torch.nn.functional.normalize(torch.randn(n_true_atoms, d_k, generator=dictionary), dim=-1)
    values = torch.nn.functional.normalize(torch.randn(n_true_atoms, d_v, generator=dictionary), dim=-1)
    mean_state = 0.1 * torch.randn(d_k, d_v, generator=dictionary)
    chosen = torch.randint(0, n_true_atoms, (n, atoms_per_state), generator=gen)
    coefficients = 0.5 + torch.rand(n, atoms_per_state, generator=gen)
    states = torch.einsum("nj,njk,njv->nkv", coefficients, keys[chosen], values[chosen])
    states = states + mean_state + noise * torch.randn(n, d_k, d_v, generator=gen) / (d_k * d_v) ** 0.5
    return states.reshape(n, d_k * d_v)


def train_step(sae: TrainingSAE, optimizer: torch.optim.Optimizer, batch: torch.Tensor, step: int) -> None:
    output = sae.training_forward_pass(
        TrainStepInput(
            sae_in=batch,
            coefficients={},
            dead_neuron_mask=None,
            n_training_steps=step,
            is_logging_step=False,
        )
    )
    output.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(sae: TrainingSAE, batches: list[torch.Tensor], args: argparse.Namespace) -> list[float]:
    """Train for args.steps steps; return the wall time of the last args.timed_steps of them."""
    optimizer = torch.optim.Adam(sae.parameters(), lr=args.lr)
    times = []
    for step in range(args.steps):
        batch = batches[step % len(batches)]
        synchronize(args.device)
        start = time.perf_counter()
        train_step(sae, optimizer, batch, step)
        synchronize(args.device)
        if step >= args.steps - args.timed_steps:
            times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def reconstruction_quality(sae: TrainingSAE, held_out: torch.Tensor) -> tuple[float, float]:
    recon = sae(held_out)
    mse = (recon - held_out).pow(2).mean().item()
    variance = (held_out - held_out.mean(0)).pow(2).mean().item()
    return mse, 1.0 - mse / variance


def n_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def bench_one_size(d: int, args: argparse.Namespace) -> dict[str, float]:
    d_in = d * d
    states = write_shaped_states(
        args.batch * (args.n_batches + 1), d, d, args.true_atoms, args.atoms_per_state,
        args.noise, seed=1,
    )  # fmt: skip
    states = states.to(args.device)
    batches = list(states[: args.batch * args.n_batches].split(args.batch))
    held_out = states[args.batch * args.n_batches :]

    torch.manual_seed(0)
    write = WriteTopKTrainingSAE(
        WriteTopKTrainingSAEConfig(
            d_in=d_in, d_sae=args.d_sae, d_k=d, d_v=d, k=args.k, device=args.device
        )
    )
    flat = TopKTrainingSAE(
        TopKTrainingSAEConfig(d_in=d_in, d_sae=args.d_sae, k=args.k, device=args.device)
    )
    with torch.no_grad():  # the same decoder-bias start for both: the first batch's mean
        flat.b_dec.copy_(batches[0].mean(0))

    results = {}
    for name, sae in (("write", write), ("flat", flat)):
        times = run(sae, batches, args)
        mse, explained = reconstruction_quality(sae, held_out)
        results |= {
            f"{name}_step_s": statistics.median(times),
            f"{name}_params": n_parameters(sae),
            f"{name}_mse": mse,
            f"{name}_explained_variance": explained,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128], help="d_k = d_v values")
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="training steps per SAE")
    parser.add_argument("--timed-steps", type=int, default=6, help="last steps that are timed")
    parser.add_argument("--n-batches", type=int, default=8, help="distinct training batches")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--true-atoms", type=int, default=512)
    parser.add_argument("--atoms-per-state", type=int, default=4)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.timed_steps > args.steps:
        parser.error("--timed-steps cannot exceed --steps")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(
        f"device={args.device} threads={torch.get_num_threads()} d_sae={args.d_sae} k={args.k} "
        f"batch={args.batch} steps={args.steps} (median of last {args.timed_steps} timed) lr={args.lr}"
    )
    header = (
        f"{'d_k=d_v':>7} {'write ms':>9} {'flat ms':>9} {'speedup':>8} {'write params':>13} "
        f"{'flat params':>12} {'param ratio':>11} {'write MSE':>10} {'flat MSE':>10} "
        f"{'write EV':>8} {'flat EV':>8}"
    )
    print(header)
    for d in args.dims:
        r = bench_one_size(d, args)
        print(
            f"{d:>7} {1e3 * r['write_step_s']:>9.1f} {1e3 * r['flat_step_s']:>9.1f} "
            f"{r['flat_step_s'] / r['write_step_s']:>7.2f}x {r['write_params']:>13,} "
            f"{r['flat_params']:>12,} {r['flat_params'] / r['write_params']:>10.1f}x "
            f"{r['write_mse']:>10.3e} {r['flat_mse']:>10.3e} "
            f"{r['write_explained_variance']:>8.3f} {r['flat_explained_variance']:>8.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
