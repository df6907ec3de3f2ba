"""Structured JSON logs on stderr, one object a line, with the request id.

Nothing here logs bodies, names, tokens, secrets or query strings. Exception
reports carry the exception type and the stack frames (file, line, function)
but not the exception message, which could quote patient data.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
import traceback
from typing import Any

import orjson

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


def safe_traceback(exc: BaseException) -> dict[str, Any]:
    frames = traceback.extract_tb(exc.__traceback__)
    return {
        "type": type(exc).__module__ + "." + type(exc).__qualname__,
        "frames": [f"{f.filename}:{f.lineno} in {f.name}" for f in frames[-20:]],
    }


_second_cache: tuple[int, str] = (-1, "")


def _utc_timestamp(created: float) -> str:
    global _second_cache
    second = int(created)
    if _second_cache[0] != second:
        _second_cache = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{_second_cache[1]}.{int((created - second) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _utc_timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid:
            doc["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info and record.exc_info[1] is not None:
            doc["exception"] = safe_traceback(record.exc_info[1])
        return orjson.dumps(doc, default=str).decode()


def configure(level: str) -> None:
    # Skip per-record work we never print (caller lookup, thread and process names).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def dict_config(level: str) -> dict[str, Any]:
    """logging.dictConfig for servers that configure logging themselves (Granian): JSON everywhere."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "fhirvault.logs.JsonFormatter"}},
        "handlers": {"console": handler, "access": handler},
        "loggers": {
            "_granian": {"handlers": ["console"], "level": level.upper(), "propagate": False},
            "granian.access": {"handlers": ["access"], "level": "WARNING", "propagate": False},
        },
        "root": {"handlers": ["console"], "level": level.upper()},
    }
