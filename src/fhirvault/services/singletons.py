"""A cluster singleton that follows its leadership role from process to process."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from fhirvault.ports import Leadership

log = logging.getLogger("fhirvault.leadership")


class Startable(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


S = TypeVar("S", bound=Startable)


class LeaderOnly(Generic[S]):
    """Runs ``make()`` while this process holds ``role``: started when the role is taken (at start-up,
    or when the previous holder died or lost its database session), stopped when it is lost.

    ``follow`` is called on a schedule (every few seconds): that period bounds the hand-over."""

    def __init__(self, leadership: Leadership | None, role: str, make: Callable[[], S]) -> None:
        self._leadership = leadership
        self._role = role
        self._make = make
        self.running: S | None = None
        # ``follow`` runs in a worker thread (the server's housekeeping) while ``stop`` comes from the
        # shutdown: one at a time, and nothing starts once stopped (a job started during the shutdown
        # was never stopped, or was joined before its thread started).
        self._lock = threading.RLock()
        self._closed = False

    def follow(self) -> S | None:
        with self._lock:
            if self._closed:
                return None
            leads = self._leadership is None or self._leadership.lead(self._role)
            if leads and self.running is None:
                log.info("cluster singleton starts here", extra={"role": self._role})
                self.running = self._make()
                self.running.start()
            elif not leads and self.running is not None:
                log.warning("cluster singleton stops here: the role was lost", extra={"role": self._role})
                self._halt()
            return self.running

    def stop(self) -> None:
        """For good (shutdown): a later ``follow`` starts nothing."""
        with self._lock:
            self._closed = True
            self._halt()

    def _halt(self) -> None:
        running, self.running = self.running, None
        if running is not None:
            running.stop()
