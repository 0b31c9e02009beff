"""The daemon's log lines: one per record, logfmt ("text") or JSON, naming job, step, rank, node.

Context travels in ``extra=``, so the message stays readable and the fields stay
machine-readable::

    logger.info("rebuilt ranks %s", need, extra={"job": job, "step": step, "node": 2})

gives ``ts=… level=info logger=… pid=… job=j step=5 node=2 msg="rebuilt ranks [2]"``.
``node`` is this daemon's index in the job's node list; ``peer`` another node (its index in
the job, or its control address where no job is concerned).
A traceback stays in its record: escaped in logfmt, a field in JSON.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

FORMATS = ("text", "json")
# First in every line, in this order; any other extra= field follows the message.
CONTEXT = ("job", "step", "rank", "node", "peer")
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime"}
# Line breaks that str.splitlines() honours besides \n and \r, which JSON leaves alone.
_BREAKS = str.maketrans({c: f"\\u{ord(c):04x}" for c in "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """A record's fields in line order: ts, level, logger, pid, context, msg, other extras, exc."""
    out: dict[str, Any] = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "logger": record.name,
        "pid": record.process,
    }
    extra = {k: v for k, v in vars(record).items()
             if k not in _STANDARD and not k.startswith("_") and v is not None}
    for key in CONTEXT:
        if key in extra:
            out[key] = extra.pop(key)
    out["msg"] = record.getMessage()
    out.update(sorted(extra.items()))
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        out["exc"] = record.exc_text
    if record.stack_info:
        out["stack"] = record.stack_info
    return out


class LogfmtFormatter(logging.Formatter):
    """``key=value`` pairs; a value with spaces, quotes, ``=`` or line breaks is quoted, escaped."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in fields(record).items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(fields(record), ensure_ascii=False, default=str).translate(_BREAKS)


def _logfmt_value(value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' "=\\'):
        return text
    return json.dumps(text, ensure_ascii=False).translate(_BREAKS)


def formatter(name: str) -> logging.Formatter:
    """The formatter of a ``log_format`` option value."""
    if name == "text":
        return LogfmtFormatter()
    if name == "json":
        return JsonFormatter()
    raise ValueError(f"log format {name!r} is not one of {FORMATS}")


def configure(level: str, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every record at ``level`` and above to ``stream`` (stderr), one line each."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(fmt))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
