"""Faults a run folder must survive, on a tiny random Llama: a second writer, damaged checkpoints
and streams, a full disk while checkpointing. Each ends in one line and changes no file of the run."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.pipeline.checkpoint import RunFolder
from experiments.pipeline.run import run
import experiments.pipeline.run as run_module
from tests.helpers import run_options, tiny_hparams
from tests.test_evaluate_run import contents, fresh, options  # noqa: F401 (fixtures)
from util.cli import run_cli
from util.errors import RunError
from util.files import JsonlStream, read_jsonl
from util.paths import PROJECT_ROOT



def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli_error(capsys, call) -> str:
    """`call` run as a command-line tool: exit code 2 and exactly one line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(call)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_a_second_process_continuing_a_run_is_refused_and_the_first_completes(options, tokenizer, monkeypatch):
    reference = run(options, fresh(tokenizer), tiny_hparams())
    path = run(dataclasses.replace(options, stop_after=2), fresh(tokenizer), tiny_hparams())
    assert path.name == "run_002"
    real_apply = run_module.apply_edits
    seen = {}

    def apply_and_meanwhile_continue_again(session, records):
        if not seen:  # while this process holds run_002, another tries to continue it
            before = snapshot(path)
            seen["child"] = subprocess.run(
                [sys.executable, "-m", "experiments.evaluate", "--continue_from_run", path.name,
                 "--results_dir", options.results_dir, "--alg_name", options.alg_name],
                cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, capture_output=True, text=True,
                timeout=300)
            seen["unchanged"] = snapshot(path) == before
        return real_apply(session, records)

    monkeypatch.setattr(run_module, "apply_edits", apply_and_meanwhile_continue_again)
    assert run(dataclasses.replace(options, continue_from_run=path.name), fresh(tokenizer)) == path
    child = seen["child"]
    assert child.returncode == 2 and child.stderr.count("\n") == 1, child.stderr
    assert child.stderr.startswith("error: ") and "run_002" in child.stderr and f"pid {os.getpid()}" in child.stderr
    assert seen["unchanged"]
    assert contents(path) == contents(reference)


def test_a_new_run_is_locked_while_it_is_written(tmp_path):
    folder = RunFolder.create(tmp_path, "MEMIT")
    with pytest.raises(RunError, match=rf"run_001 is in use by pid {os.getpid()} "):
        RunFolder(folder.path).lock()
    folder.close()  # released: the next writer may take it
    again = RunFolder(folder.path)
    again.lock()
    again.close()


def remove(path: Path) -> None:
    path.unlink()


def halve(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def shorten(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def append_line(path: Path) -> None:
    with path.open("a") as handle:
        handle.write('{"kind": "probe", "n_edits": 99}\n')


CORRUPTIONS = {  # name: (file, change, text expected in the message)
    "state.json deleted": ("checkpoint/state.json", remove, "state.json missing"),
    "state.json truncated": ("checkpoint/state.json", halve, "state.json is damaged"),
    "weights truncated": ("checkpoint/weights_*", halve, "weights_000002_000002_"),
    "weights deleted": ("checkpoint/weights_*", remove, "weights_000002_000002_"),
    "stream shorter": ("edits.jsonl", shorten, "edits.jsonl holds"),
    "stream longer": ("probes.jsonl", append_line, "probes.jsonl holds"),
    "no checkpoint": ("checkpoint", shutil.rmtree, "state.json missing"),
}


@pytest.fixture(scope="module")
def paused_run(tmp_path_factory, tokenizer):
    """A run paused after 2 of 5 edits (a clean end: its checkpoint records every byte)."""
    root = tmp_path_factory.mktemp("paused")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KEDIT_CACHE", str(root / "cache"))
        opts = run_options(root)
        path = run(dataclasses.replace(opts, stop_after=2), fresh(tokenizer), tiny_hparams())
    return opts, path


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_damaged_checkpoint_stops_continue_in_one_line_and_changes_nothing(paused_run, tokenizer, capsys, tmp_path, corruption):
    opts, original = paused_run
    results = tmp_path / "results"
    shutil.copytree(Path(opts.results_dir), results)
    path = results / original.relative_to(opts.results_dir)
    pattern, change, expected = CORRUPTIONS[corruption]
    (target,) = path.glob(pattern)
    change(target)
    before = snapshot(path)
    again = dataclasses.replace(opts, results_dir=str(results), continue_from_run=path.name)
    err = cli_error(capsys, lambda: run(again, fresh(tokenizer)))
    assert expected in err and str(path) in err, err
    assert snapshot(path) == before


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(options, tokenizer, monkeypatch):
    reference = run(options, fresh(tokenizer), tiny_hparams())
    path = run(dataclasses.replace(options, stop_after=2), fresh(tokenizer), tiny_hparams())
    again = dataclasses.replace(options, continue_from_run=path.name)
    real_fsync = os.fsync

    committed = []

    def full_disk(fd: int) -> None:  # the disk fills after the session's first commit of state.json
        name = os.readlink(f"/proc/self/fd/{fd}")
        if name.endswith(".partial"):
            if committed:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            committed.append(name)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(RunError) as failure:
        run(again, fresh(tokenizer))  # its first checkpoint, after 4 edits, cannot be written
    message = str(failure.value)
    assert str(path / "checkpoint") in message and f"errno {errno.ENOSPC}" in message and "\n" not in message
    assert "previous checkpoint is intact" in message
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert not list(path.rglob("*.partial"))
    folder = RunFolder(path)
    assert folder.verify()["n_edits"] == 2
    assert len(read_jsonl(path / "edits.jsonl")) == 4  # written after the checkpoint: cut on resume
    assert run(again, fresh(tokenizer)) == path
    assert json.loads((path / "summary.json").read_text())["status"] == "complete"
    assert contents(path) == contents(reference)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="Linux /dev/full: every write fails with ENOSPC")
def test_a_full_disk_while_streaming_is_one_line_with_the_path_and_errno():
    stream = JsonlStream(Path("/dev/full"))
    with pytest.raises(RunError) as failure:
        stream.write({"n_edits": 1})
    message = str(failure.value)
    assert message.startswith("cannot write /dev/full: ") and f"(errno {errno.ENOSPC})" in message and "\n" not in message
    stream.close()  # its unflushed line is dropped, not raised again


def test_a_plot_that_cannot_be_written_is_one_line_with_the_path(tmp_path):
    from experiments.reporting.plots import write_plots

    for name in ("edits", "probes"):
        (tmp_path / f"{name}.jsonl").write_text("")
    (tmp_path / "downstream.partial.png").mkdir()  # the temporary name is taken by a folder: EISDIR
    with pytest.raises(RunError, match=rf"cannot write {tmp_path / 'downstream.png'}: .*\(errno {errno.EISDIR}\)"):
        write_plots(tmp_path)
