"""What the database engines raise, for callers that report it without choosing an engine (the CLI)."""

from __future__ import annotations

import sqlite3

import psycopg

DATABASE_ERRORS: tuple[type[Exception], ...] = (sqlite3.DatabaseError, psycopg.Error)
