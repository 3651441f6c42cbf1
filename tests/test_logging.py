"""Status messages go through ``logging`` under "mtkd": said on rank zero only, shown by the CLI
on stderr (stdout keeps the tables), silenced or redirected by the user's logger settings, and
the library leaves the root logger alone."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from lightning_utilities.core.rank_zero import rank_zero_only

from mtkd import cli
from mtkd.status import status_logger

pytestmark = pytest.mark.unit


def test_a_status_message_is_said_on_rank_zero_only(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mtkd")
    log = status_logger("mtkd.test_status")
    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)
    log.info("from rank one")
    monkeypatch.setattr(rank_zero_only, "rank", 0, raising=False)
    log.info("from rank zero")
    assert caplog.messages == ["from rank zero"]
    assert caplog.records[0].name == "mtkd.test_status"


def test_the_cli_shows_status_messages_on_stderr_and_keeps_stdout_for_results(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root_handlers = list(logging.getLogger().handlers)
    assert cli.main(["init", str(tmp_path / "proj")]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("starter project written: ")
    assert f"next: {tmp_path / 'proj' / 'README.md'}\n" in err
    # Only for the command: no handler or level left behind, the root logger untouched.
    for name in cli.MESSAGE_LOGGERS:
        assert (logging.getLogger(name).handlers, logging.getLogger(name).level) == ([], 0)
        assert logging.getLogger(name).propagate
    assert logging.getLogger().handlers == root_handlers


def test_a_user_silences_the_status_messages_with_the_mtkd_logger_level(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    logger = logging.getLogger("mtkd")
    logger.setLevel(logging.WARNING)
    try:
        assert cli.main(["init", str(tmp_path / "proj")]) == 0
        assert logger.level == logging.WARNING  # the user's level is kept
    finally:
        logger.setLevel(logging.NOTSET)
    assert capsys.readouterr() == ("", "")
