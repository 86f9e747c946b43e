"""Staged result folders (outputs.staged_output) and atomic SAE folders (saes.saving): nothing half-written, no input
ever deleted, stale temporary folders of killed runs cleaned, and results with the user's umask."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from writesae_lens.outputs import apply_umask, check_output_folder, current_umask, remove_stale, staged_output
from writesae_lens.saes.saving import write_folder_atomically


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def hidden(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_success_moves_results_in(tmp_path):
    with staged_output(tmp_path / "out") as folder:
        (folder / "records.csv").write_text("new")
        assert not (tmp_path / "out").exists()  # nothing appears before the run succeeded
    assert (tmp_path / "out" / "records.csv").read_text() == "new"
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("error", [ValueError("bad input"), KeyboardInterrupt()])
def test_failure_or_interrupt_leaves_earlier_results(tmp_path, error):
    out = tmp_path / "out"
    out.mkdir()
    (out / "records.csv").write_text("earlier")
    with pytest.raises(type(error)):
        with staged_output(out, overwrite=True) as folder:
            (folder / "records.csv").write_text("half")
            raise error
    assert (out / "records.csv").read_text() == "earlier"
    assert hidden(tmp_path) == []


def test_overwrite_replaces_only_what_the_run_wrote(tmp_path):
    out = tmp_path / "out"
    (out / "sae").mkdir(parents=True)
    (out / "sae" / "cfg.json").write_text("{}")
    (out / "records.csv").write_text("earlier")
    with staged_output(out, overwrite=True, inputs=[out / "sae"]) as folder:
        (folder / "records.csv").write_text("new")
    assert (out / "records.csv").read_text() == "new"
    assert (out / "sae" / "cfg.json").read_text() == "{}"


@pytest.mark.parametrize("input_name", ["sae", "sae/nested/cfg.json"])
def test_a_result_that_would_replace_an_input_is_refused(tmp_path, input_name):
    out = tmp_path / "out"
    (out / "sae" / "nested").mkdir(parents=True)
    (out / "sae" / "nested" / "cfg.json").write_text("{}")
    with pytest.raises(FileExistsError, match=f"result 'sae' would replace {out / 'sae'}, which holds its input"):
        with staged_output(out, overwrite=True, inputs=[out / input_name]) as folder:
            (folder / "sae").mkdir()
    assert (out / "sae" / "nested" / "cfg.json").read_text() == "{}"
    assert hidden(tmp_path) == []


def test_non_empty_out_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("mine")
    with pytest.raises(FileExistsError, match=f"output folder {tmp_path / 'out'} is not empty.*--overwrite"):
        with staged_output(tmp_path / "out"):
            pass


@pytest.mark.parametrize("relative", ["f", "f/below"])
def test_out_that_is_or_lies_under_a_file(tmp_path, relative):
    (tmp_path / "f").write_text("mine")
    with pytest.raises(FileExistsError, match=f"{tmp_path / 'f'}.*is a file"):
        check_output_folder(tmp_path / relative, overwrite=True)
    assert (tmp_path / "f").read_text() == "mine"


def test_results_get_the_users_umask(tmp_path, umask_022):
    import tempfile

    with staged_output(tmp_path / "out") as folder:
        handle, name = tempfile.mkstemp(dir=folder)  # 0600, as records.write_atomically's temporary file
        os.close(handle)
        os.replace(name, folder / "records.csv")
        (folder / "sub").mkdir(mode=0o700)
        (folder / "sub" / "run.sh").write_text("#!/bin/sh\n")
        os.chmod(folder / "sub" / "run.sh", 0o700)
    out = tmp_path / "out"
    assert (mode(out), mode(out / "records.csv"), mode(out / "sub"), mode(out / "sub" / "run.sh")) == \
        (0o755, 0o644, 0o755, 0o755)


def test_records_saved_directly_get_the_users_umask(tmp_path, umask_022):
    from writesae_lens.evaluation.records import RECORD_COLUMNS, save_records

    import pandas as pd

    row = {column: 0 for column in RECORD_COLUMNS}
    path = save_records(pd.DataFrame([row]), tmp_path / "records.csv")
    assert mode(path) == 0o644


def test_apply_umask_follows_a_stricter_umask(tmp_path):
    previous = os.umask(0o077)
    try:
        assert current_umask() == 0o077
        (tmp_path / "f").write_text("x")
        os.chmod(tmp_path / "f", 0o666)
        apply_umask(tmp_path)
        assert mode(tmp_path / "f") == 0o600 and mode(tmp_path) == 0o700
    finally:
        os.umask(previous)


def test_saved_sae_folder_gets_the_users_umask(tmp_path, umask_022):
    from bad_input_helpers import write_sae

    write_sae().save_model(tmp_path / "sae")
    assert mode(tmp_path / "sae") == 0o755
    assert {mode(p) for p in (tmp_path / "sae").iterdir()} == {0o644}


def dead_pid() -> int:
    """The id of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_folders_of_dead_processes_are_removed(tmp_path):
    dead, alive = dead_pid(), os.getpid()
    names = (f".out.partial-{dead}-abc", f".out.partial-{alive}-abc", ".out.partial-old", f".other.partial-{dead}-x")
    for name in names:
        (tmp_path / name).mkdir()
    removed = remove_stale(tmp_path, ".out.partial-")
    assert [p.name for p in removed] == [f".out.partial-{dead}-abc"]
    assert hidden(tmp_path) == sorted([f".out.partial-{alive}-abc", ".out.partial-old", f".other.partial-{dead}-x"])


def test_staged_output_cleans_stale_staging_of_a_killed_run(tmp_path):
    (tmp_path / f".out.partial-{dead_pid()}-xyz").mkdir()
    (tmp_path / f".out.replaced-{dead_pid()}-xyz").mkdir()
    with staged_output(tmp_path / "out") as folder:
        (folder / "a").write_text("a")
    assert hidden(tmp_path) == []


def test_atomic_sae_folder_cleans_stale_writing_folders(tmp_path):
    stale = tmp_path / f".sae.writing-{dead_pid()}-q1"
    stale.mkdir()
    (stale / "half.safetensors").write_bytes(b"12")
    write_folder_atomically(tmp_path / "sae", lambda folder: (folder / "cfg.json").write_text("{}"))
    assert (tmp_path / "sae" / "cfg.json").read_text() == "{}"
    assert hidden(tmp_path) == []


def test_atomic_sae_folder_failure_keeps_the_old_one(tmp_path):
    write_folder_atomically(tmp_path / "sae", lambda folder: (folder / "cfg.json").write_text("old"))

    def fail(folder):
        (folder / "cfg.json").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_folder_atomically(tmp_path / "sae", fail, overwrite=True)
    assert (tmp_path / "sae" / "cfg.json").read_text() == "old"
    assert hidden(tmp_path) == []
