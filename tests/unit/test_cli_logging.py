"""The server's log says in one line that the database is away, whatever asyncpg raised for it.

asyncpg's pool logs a traceback each time it fails to reconnect; an embedded PostgreSQL that is
starting up again answers "the database system is starting up" (CannotConnectNowError), not a
refused connection, and that must read as one line too.
"""

from __future__ import annotations

import logging
import sys

import asyncpg
import pytest

from app.cli import _OneLineConnectionErrors


def _record(error: BaseException) -> logging.LogRecord:
    try:
        raise error
    except BaseException:
        info = sys.exc_info()
    return logging.LogRecord(
        "asyncpg.pool",
        logging.WARNING,
        __file__,
        1,
        "Failed to restore the pool connection floor; retrying",
        (),
        info,
    )


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "Connect call failed"),
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    ],
)
def test_a_database_away_is_one_line_without_a_traceback(error: BaseException) -> None:
    record = _record(error)
    assert _OneLineConnectionErrors().filter(record)
    assert record.exc_info is None
    assert record.getMessage().endswith(f"({type(error).__name__})")


def test_other_errors_keep_their_traceback() -> None:
    record = _record(ValueError("a bug"))
    assert _OneLineConnectionErrors().filter(record)
    assert record.exc_info is not None
