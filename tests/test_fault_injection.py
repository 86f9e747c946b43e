"""Fault injection: a run that fails, is interrupted (SIGINT, SIGTERM) or killed (SIGKILL) mid-run or mid-save leaves
the previous result intact and nothing that looks complete; a rerun succeeds (and cleans what a killed run left).

The interrupted runs are real ``writesae`` processes on the shipped tiny model, signalled once their staging folder
exists (the model is loaded and the run has started)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from bad_input_helpers import saved_write_sae, write_sae

from writesae_lens.cli import main

EARLIER = {"records.csv": "earlier records", "summary.txt": "earlier summary"}
# long enough to be interrupted mid-run (the replacement test alone takes well over the signal delay)
LONG_SUBST = ["substitution", "--model", "qwen35-tiny", "--layer", "1", "--head", "0", "--passages", "64",
              "--passage-len", "256", "--max-firings-per-feature", "1000"]
SMALL_SUBST = ["substitution", "--model", "qwen35-tiny", "--layer", "1", "--head", "0", "--passages", "3",
               "--passage-len", "32", "--max-firings", "12"]


@pytest.fixture(scope="module")
def sae_folder(tmp_path_factory):
    return saved_write_sae(tmp_path_factory.mktemp("saes") / "sae", model_name="qwen35-tiny", layer=1, head=0)


def earlier_result(out: Path) -> Path:
    out.mkdir(parents=True)
    for name, text in EARLIER.items():
        (out / name).write_text(text)
    return out


def assert_earlier_intact(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) >= sorted(EARLIER)
    for name, text in EARLIER.items():
        assert (out / name).read_text() == text, name


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def start(argv, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(predicate, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"the process ended early ({process.returncode}): {process.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the run to start")
        time.sleep(0.05)


def staging_exists(folder: Path, prefix: str):
    return lambda: any(p.name.startswith(prefix) for p in folder.iterdir())


def interrupt_mid_run(argv, tmp_path: Path, out: Path, sig: int, delay: float = 1.0) -> tuple[int, str]:
    process = start(["-m", "writesae_lens.cli", *map(str, argv)], tmp_path)
    wait_for(staging_exists(out.parent, f".{out.name}.partial-"), process)
    time.sleep(delay)
    assert process.poll() is None, "the run finished before it could be interrupted"
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    return process.returncode, err


def test_overwrite_with_a_typo_keeps_the_earlier_result(sae_folder, tmp_path, capsys):
    out = earlier_result(tmp_path / "out")
    bad = [*SMALL_SUBST, "--sae", sae_folder, "--out", out, "--overwrite"]
    bad[bad.index("--layer") + 1] = "3"  # the attention layer: a typo
    assert main([str(a) for a in bad]) == 2
    assert "not a recurrent layer" in capsys.readouterr().err
    assert_earlier_intact(out)
    assert hidden(tmp_path) == []


def test_overwrite_never_deletes_an_sae_inside_out(tmp_path, capsys):
    out = earlier_result(tmp_path / "d")
    saved_write_sae(out / "sae", model_name="qwen35-tiny", layer=1, head=0)
    argv = [*SMALL_SUBST, "--sae", out / "sae", "--out", out, "--overwrite"]
    assert main([str(a) for a in argv]) == 0
    assert (out / "sae" / "cfg.json").exists() and (out / "sae" / "sae_weights.safetensors").exists()
    assert (out / "records.csv").read_text() != EARLIER["records.csv"]
    assert (out / "kl_scatter.png").stat().st_size > 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_substitution_keeps_the_earlier_result(sig, sae_folder, tmp_path, capsys):
    out = earlier_result(tmp_path / "out")
    code, err = interrupt_mid_run([*LONG_SUBST, "--sae", sae_folder, "--out", out, "--overwrite"], tmp_path, out, sig)
    assert code == 130, err[-2000:]
    assert f"writesae substitution: interrupted; {out} was left as it was" in err
    assert "Traceback" not in err
    assert_earlier_intact(out)
    assert not (out / "kl_scatter.png").exists()
    assert hidden(tmp_path) == []  # the staging folder is gone
    assert main([str(a) for a in [*SMALL_SUBST, "--sae", sae_folder, "--out", out, "--overwrite"]]) == 0
    assert (out / "records.csv").read_text() != EARLIER["records.csv"]


def test_killed_substitution_keeps_the_earlier_result_and_a_rerun_cleans_up(sae_folder, tmp_path):
    out = earlier_result(tmp_path / "out")
    code, _ = interrupt_mid_run([*LONG_SUBST, "--sae", sae_folder, "--out", out, "--overwrite"], tmp_path, out,
                                signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert_earlier_intact(out)
    assert [name.split("-")[0] for name in hidden(tmp_path)] == [".out.partial"]  # hidden, and not in out
    assert main([str(a) for a in [*SMALL_SUBST, "--sae", sae_folder, "--out", out, "--overwrite"]]) == 0
    assert (out / "records.csv").read_text() != EARLIER["records.csv"]
    assert hidden(tmp_path) == []


def test_sae_save_killed_midway_keeps_the_old_sae_and_a_rerun_cleans_up(tmp_path):
    """SIGKILL while save_model writes: the saved SAE is untouched; the next save removes the .sae.writing-* left."""
    from sae_lens import SAE

    import writesae_lens.saes  # noqa: F401

    sae_dir = saved_write_sae(tmp_path / "sae", model_name="qwen35-tiny", layer=1, head=0, seed=1)
    before = {p.name: p.read_bytes() for p in sae_dir.iterdir()}
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import sae_lens.saes.sae as saes
        from bad_input_helpers import write_sae
        original = saes.SAE.save_model
        def slow(self, path, *args, **kwargs):
            written = original(self, path, *args, **kwargs)
            print("written", flush=True)
            time.sleep(120)
            return written
        saes.SAE.save_model = slow
        write_sae(seed=2).save_model({str(sae_dir)!r}, overwrite=True)
    """)
    process = start(["-c", script], tmp_path)
    assert process.stdout.readline().strip() == "written"
    process.kill()
    process.wait(timeout=30)
    assert {p.name: p.read_bytes() for p in sae_dir.iterdir()} == before
    assert [name.split("-")[0] for name in hidden(tmp_path)] == [".sae.writing"]
    SAE.load_from_disk(sae_dir)
    write_sae(seed=3).save_model(sae_dir, overwrite=True)
    assert hidden(tmp_path) == []
    assert {p.name: p.read_bytes() for p in sae_dir.iterdir()} != before


def test_interrupted_training_is_short_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--model", "qwen35-tiny", "--layer", "1", "--head", "0", "--d-sae", "64", "--k", "4",
            "--context-size", "64", "--batch-tokens", "512", "--training-tokens", str(512 * 100_000), "--out", out]
    code, err = interrupt_mid_run(argv, tmp_path, out, signal.SIGINT, delay=3.0)
    assert code == 130, err[-2000:]
    assert "Traceback" not in err
    assert f"writesae train: interrupted; {out} was left as it was" in err
    assert not out.exists() and not (tmp_path / "checkpoints").exists()
    assert hidden(tmp_path) == []
