"""What the database engines raise, for callers that report it without choosing an engine (the CLI)."""

from __future__ import annotations

import re
import sqlite3

import psycopg

from fhirvault.ports import StoreUnavailable

DATABASE_ERRORS: tuple[type[Exception], ...] = (sqlite3.DatabaseError, psycopg.Error, StoreUnavailable)

# A password as libpq may echo part of a connection string: key=value, or the user:password@ of URLs
# (one or several hosts).
_SECRETS = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)|(://[^:/@\s]*:)[^@\s]*(@)", re.IGNORECASE)


def redacted(message: str) -> str:
    """``message`` with any database password in it replaced by ***."""
    return _SECRETS.sub(lambda m: f"{m[1]}***" if m[1] else f"{m[3]}***{m[4]}", message)


def describe(exc: Exception) -> str:
    """One line for the operator about a database error (every host libpq tried), never with a password."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return redacted("; ".join(lines) or type(exc).__name__)
