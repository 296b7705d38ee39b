"""The front door: one `ranker` help naming every command, each command's own help, one seed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import fit_cli
from pipelines.commands import JOBS, main
from tests.pipelines.test_fit_e2e import fit_args


def test_the_help_names_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for command in JOBS:
        assert f"  {command} " in out
    assert set(JOBS) >= {"synth", "fit", "tune", "evaluate", "compare", "export", "serve"}


@pytest.mark.parametrize("command", list(JOBS))
def test_each_command_has_its_own_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code in (0, None)
    assert "usage" in capsys.readouterr().out.lower()


@pytest.mark.parametrize("words", [["bogus"], ["validate", "--help"], ["fitt"]])
def test_an_unknown_command_is_a_clear_error(
    words: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        main(words)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"unknown command '{words[0]}'" in err and "fit, tune" in err


@pytest.mark.parametrize(
    ("flags", "seed"),
    [(["--seed_everything", "5"], 5), (["--seed_everything", "5", "--data.seed", "3"], 3)],
)
def test_seed_everything_seeds_the_data_order(
    tiny_log: Path, tmp_path: Path, flags: list[str], seed: int
) -> None:
    uri = ["--trainer.logger.init_args.tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    args = fit_args(tiny_log, tmp_path / "checkpoints", *uri, *flags)[1:]  # without "fit"
    cli = fit_cli(args, run=False, parser_kwargs={"exit_on_error": False})
    assert cli.datamodule.seed == seed


def test_a_fit_prints_its_own_lines_only(tiny_log: Path, tmp_path: Path) -> None:
    """A real `ranker fit` process: no third-party tip, deprecation warning or FLOPs table;
    the summary line, the accounting table and the report are there."""
    args = fit_args(
        tiny_log,
        tmp_path / "checkpoints",
        "--trainer.max_epochs",
        "1",
        "--trainer.logger.init_args.tracking_uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--trainer.enable_progress_bar",
        "false",
    )
    ranker = Path(sys.executable).parent / "ranker"
    done = subprocess.run([str(ranker), *args], capture_output=True, text=True, check=True)
    screen = done.stdout + done.stderr
    for noise in ("Tip", "Warning", "FLOPs", "GPU available", "Seed set"):
        assert noise not in screen, noise
    assert "parameters) on synthetic" in screen and "| train |" in screen and "│ mean" in screen
    assert "id dropout (auto: item-side features over 1,000 ids): item_id 0.1" in screen
    # the tiny log's catalogue stays (a few validation rows hold an unseen item): one rate
    stays = r"catalogue: item_id \(stays; validation rows unseen: item_id \d\.\d%\)"
    assert re.search(stays, screen)
    rule = "item-side over 1,000 ids, 20%+ of validation rows unseen, at 0.01"
    assert f"embedding learning rates ({rule}): 0.05 for user_id, item_id, author_id," in screen
    assert "0.01 for" not in screen


def test_quiet_drops_lightning_chatter_and_keeps_the_run_s_lines() -> None:
    """What `ranker` installs unless --verbose: a filter on Lightning's log handlers."""
    import logging

    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    from pipelines.quiet import quiet

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    logger = logging.getLogger("lightning.pytorch")
    collect = Collect()
    logger.addHandler(collect)
    try:
        rank_zero_info("💡 Tip: try something else")  # before: kept (as with --verbose)
        quiet()
        rank_zero_info("💡 Tip: try something else")
        rank_zero_info("checkpoints and early stopping: val mean GAUC")
    finally:
        logger.removeHandler(collect)
    assert collect.messages == [
        "💡 Tip: try something else",
        "checkpoints and early stopping: val mean GAUC",
    ]
