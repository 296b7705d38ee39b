"""Checkpoints are written atomically: a failed write (a full disk) keeps the previous one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.checkpoints import AtomicCheckpointIO, CheckpointWriteError, umask
from pipelines.cli import fit_cli
from tests.pipelines.test_fit_e2e import fit_args


def test_a_checkpoint_is_written_whole_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 3, "w": torch.arange(5)}, path)
    assert torch.load(path)["step"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask()  # as any file the run writes


# A child process under a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored): the operating
# system refuses the write past the limit with EFBIG, as a full disk refuses it with ENOSPC.
FULL_DISK = """
import resource, signal, sys, torch
from pipelines.checkpoints import AtomicCheckpointIO, CheckpointWriteError, umask
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
try:
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(1_000_000)}, sys.argv[1])  # 4 MB
except CheckpointWriteError as err:
    print(err)
    sys.exit(3)
"""


def test_a_write_that_fails_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    before = path.read_bytes()
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(path)], capture_output=True, text=True
    )
    assert done.returncode == 3, done.stderr
    assert f"could not write checkpoint {path}" in done.stdout
    assert "previous checkpoint there (if any) is intact" in done.stdout
    assert path.read_bytes() == before  # the previous checkpoint, as it was
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file


def test_a_checkpoint_that_cannot_be_serialised_touches_no_file(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    with pytest.raises(Exception) as caught:  # whatever pickling raises
        AtomicCheckpointIO().save_checkpoint({"f": lambda: 0}, path)
    assert not isinstance(caught.value, CheckpointWriteError)
    assert list(tmp_path.iterdir()) == []


def test_ranker_fit_writes_checkpoints_atomically(tiny_log: Path, tmp_path: Path) -> None:
    uri = ["--trainer.logger.init_args.tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    args = fit_args(tiny_log, tmp_path / "checkpoints", *uri)[1:]  # without "fit"
    cli = fit_cli(args, run=False, parser_kwargs={"exit_on_error": False})
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
