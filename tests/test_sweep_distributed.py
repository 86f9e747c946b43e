"""The sweep under torch.distributed: 2 gloo processes on CPU split the runs and give the single process's results."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from writesae_lens.sweeps.distributed import process_group, world_from_environment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    ranks = world_from_environment()
    outcome = {"rank": ranks.rank, "world": ranks.world, "share": ranks.share(list(range(5)))}
    with process_group(ranks, "cpu"):
        ranks.agree(True, "unused")
        try:
            ranks.agree(ranks.rank == 0, "rank 1 failed")  # rank 1 fails: both ranks must stop
            outcome["second"] = "passed"
        except RuntimeError as error:
            outcome["second"] = str(error)
        ranks.barrier()
    Path(folder, f"rank{rank}.json").write_text(json.dumps(outcome))


def test_two_gloo_ranks_split_the_runs_and_stop_together(tmp_path):
    mp.spawn(_rank_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    outcomes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [o["share"] for o in outcomes] == [[0, 2, 4], [1, 3]]
    assert all(o["world"] == 2 for o in outcomes)
    assert [o["second"] for o in outcomes] == ["rank 1 failed", "rank 1 failed"]


CONFIG = """
model = "qwen35-tiny"
seeds = [3]
[cells]
list = [[0, 2], [1, 0], [2, 1]]
[train]
context_size = 16
training_tokens = 128
batch_tokens = 64
lr = 3e-3
warmup_steps = 1
[[variants]]
name = "topk"
d_sae = 16
k = 4
[substitution]
passages = 2
passage_len = 12
max_firings_per_feature = 2
metrics_passages = 1
"""


def sweep(command: list[str], config: Path, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([*command, "-m", "writesae_lens.cli", "sweep", str(config), "--out", str(out),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_torchrun_with_two_gloo_ranks_equals_one_process(tmp_path):
    import pandas as pd
    import torch
    from safetensors.torch import load_file

    config = tmp_path / "sweep.toml"
    config.write_text(CONFIG, encoding="utf-8")
    sweep([sys.executable], config, tmp_path / "one")
    sweep([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"], config,
          tmp_path / "two")
    one, two = pd.read_csv(tmp_path / "one" / "results.csv"), pd.read_csv(tmp_path / "two" / "results.csv")
    assert len(one) == 3
    pd.testing.assert_frame_equal(one, two)
    for name in one["run"]:
        a = load_file(tmp_path / "one" / "runs" / name / "sae" / "sae_weights.safetensors")
        b = load_file(tmp_path / "two" / "runs" / name / "sae" / "sae_weights.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
