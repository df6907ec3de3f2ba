"""LeaderOnly: a cluster singleton runs where its role is held, and moves with it."""

from __future__ import annotations

import threading
import time

from fhirvault.ports import WriteTx
from fhirvault.services.singletons import LeaderOnly


class Roles:
    def __init__(self) -> None:
        self.holder: str | None = None

    def for_process(self, name: str) -> Lead:
        return Lead(self, name)


class Lead:
    def __init__(self, roles: Roles, name: str) -> None:
        self._roles, self._name = roles, name

    def lead(self, role: str) -> bool:
        if self._roles.holder is None:
            self._roles.holder = self._name
        return self._roles.holder == self._name

    def fence(self, tx: WriteTx, role: str) -> None:
        pass

    def close(self) -> None:
        if self._roles.holder == self._name:
            self._roles.holder = None


class Job:
    def __init__(self, log: list[str], name: str) -> None:
        self._log, self._name = log, name

    def start(self) -> None:
        self._log.append(f"start {self._name}")

    def stop(self) -> None:
        self._log.append(f"stop {self._name}")


def test_the_singleton_starts_in_the_leader_only_and_moves_when_the_role_does() -> None:
    roles, log = Roles(), []
    a = LeaderOnly(roles.for_process("a"), "backups", lambda: Job(log, "a"))
    b = LeaderOnly(roles.for_process("b"), "backups", lambda: Job(log, "b"))
    a.follow()
    b.follow()
    a.follow()
    assert log == ["start a"]
    roles.holder = "b"  # a's session died; b took the lock
    a.follow()
    b.follow()
    assert log == ["start a", "stop a", "start b"]
    assert a.running is None and b.running is not None


class SlowStart(Job):
    """A job whose start is still running when the shutdown stops the singleton."""

    def __init__(self, log: list[str]) -> None:
        super().__init__(log, "slow")
        self.starting, self.release = threading.Event(), threading.Event()

    def start(self) -> None:
        self.starting.set()
        self.release.wait(5)
        super().start()


def test_a_stop_during_a_start_waits_for_it_and_nothing_starts_afterwards() -> None:
    log: list[str] = []
    job = SlowStart(log)
    single = LeaderOnly(None, "retention", lambda: job)
    follower = threading.Thread(target=single.follow)  # the server's housekeeping thread
    follower.start()
    assert job.starting.wait(5)
    stopper = threading.Thread(target=single.stop)  # the shutdown, meanwhile
    stopper.start()
    time.sleep(0.1)
    job.release.set()
    follower.join(5)
    stopper.join(5)
    assert log == ["start slow", "stop slow"]  # stopped after its start, not before nor never
    assert single.follow() is None and log == ["start slow", "stop slow"]
