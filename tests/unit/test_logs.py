"""The daemon's log lines: one line per record, context fields first, tracebacks kept inside."""

from __future__ import annotations

import io
import json
import logging
import re
import shlex
import sys
from typing import Any, Iterator

import pytest

from shardguard.daemon.base import logs

LOGGER = "shardguard.daemon.test"


def record(msg: str, *args: Any, extra: dict[str, Any] | None = None,
           exc: bool = False, level: int = logging.WARNING) -> logging.LogRecord:
    """A record as ``logger.log(level, msg, *args, extra=extra, exc_info=exc)`` makes it."""
    exc_info = None
    if exc:
        try:
            raise ValueError("bad\nvalue")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.getLogger(LOGGER).makeRecord(LOGGER, level, __file__, 1, msg, args,
                                                exc_info, extra=extra)


def logfmt(line: str) -> dict[str, str]:
    """Parse one logfmt line (quoted values as JSON strings)."""
    out = {}
    for m in re.finditer(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)', line):
        key, value = m.group(1), m.group(2)
        out[key] = json.loads(value) if value.startswith('"') else value
    return out


def test_logfmt_line_names_the_context_before_the_message() -> None:
    line = logs.LogfmtFormatter().format(record(
        "rebuilt ranks %s", [2], extra={"job": "llm-7", "step": 5, "node": 2, "rank": 1}))
    assert re.match(r"^ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=warning "
                    rf"logger={LOGGER} pid=\d+ job=llm-7 step=5 rank=1 node=2 "
                    r'msg="rebuilt ranks \[2\]"$', line), line


def test_logfmt_values_are_bare_or_quoted_and_escaped() -> None:
    line = logs.LogfmtFormatter().format(record(
        'say "hi"', extra={"job": "j", "where": "a=b", "empty": "", "path": "C:\\x",
                           "ok": True}))
    assert "\n" not in line
    f = logfmt(line)
    assert (f["msg"], f["where"], f["empty"], f["path"], f["ok"]) == \
        ('say "hi"', "a=b", "", "C:\\x", "true")
    assert 'msg="say \\"hi\\""' in line and "job=j " in line
    assert shlex.split(line)  # balanced quotes


def test_stopped_is_a_bare_word() -> None:
    assert logs.LogfmtFormatter().format(record("stopped")).endswith(" msg=stopped")


def test_other_extras_follow_the_message_sorted_and_none_is_left_out() -> None:
    line = logs.LogfmtFormatter().format(record(
        "x", extra={"zeta": 1, "alpha": 2, "job": "j", "step": None}))
    assert re.search(r" job=j msg=x alpha=2 zeta=1$", line), line
    assert "step=" not in line


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_multi_line_message_and_traceback_stay_one_line(fmt: str) -> None:
    rec = record("first\nsecond\r\nthird\u2028fourth", extra={"job": "j", "rank": 3}, exc=True,
                 level=logging.ERROR)
    line = logs.formatter(fmt).format(rec)
    assert len(line.splitlines()) == 1, line
    fields = json.loads(line) if fmt == "json" else logfmt(line)
    assert fields["msg"] == "first\nsecond\r\nthird\u2028fourth"
    assert fields["exc"].startswith("Traceback (most recent call last):")
    assert fields["exc"].endswith("ValueError: bad\nvalue")
    assert (str(fields["job"]), str(fields["rank"]), fields["level"]) == ("j", "3", "error")


def test_json_line_keeps_types_and_order() -> None:
    line = logs.JsonFormatter().format(record(
        "sealed slot %d", 1, extra={"job": "j", "step": 7, "rank": 0, "peer": "10.0.0.2:7000",
                                    "blob": object()}))
    doc = json.loads(line)
    assert list(doc)[:9] == ["ts", "level", "logger", "pid", "job", "step", "rank", "peer",
                             "msg"]
    assert (doc["step"], doc["rank"], doc["msg"]) == (7, 0, "sealed slot 1")
    assert doc["blob"].startswith("<object object")  # not JSON: written as its str()


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="xml"):
        logs.formatter("xml")


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_configure_routes_every_logger_through_one_formatter(root_logging: None) -> None:
    out = io.StringIO()
    logs.configure("info", "json", out)
    logging.getLogger("shardguard.daemon.storage.store").info("dropped", extra={"job": "j"})
    logging.getLogger("shardguard.daemon.storage.store").debug("not shown")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["job"] == "j"
