"""Access-review campaigns: a snapshot of every account and client, one decision each, kept in meta."""

from __future__ import annotations

import pytest

from fhirvault.adapters.memory_store import MemoryStore
from fhirvault.ports import ClientRow
from fhirvault.services.access_reviews import CLIENT, USER, AccessReviews, ReviewError
from fhirvault.services.crypto import new_key
from fhirvault.services.users import UserService

DAY = 86_400_000


class FakeClock:
    def __init__(self) -> None:
        self.ms = 1_800_000_000_000

    def now_ms(self) -> int:
        return self.ms


@pytest.fixture
def env() -> tuple[AccessReviews, MemoryStore, FakeClock, str]:
    store, clock = MemoryStore(), FakeClock()
    users = UserService(store, clock, new_key(), tenant="default")
    user_id = users.create("sofia", "security_officer", "a long enough password").user.user_id
    users.create("other-tenant-user", "nurse", "a long enough password")
    client = ClientRow("fv-1", "default", "Lab", "h", "system/*.rs", None, clock.ms)
    store.write_sync("c", lambda tx: tx.insert_client(client))
    return AccessReviews(store, clock, tenant="default"), store, clock, user_id


def test_a_campaign_snapshots_accounts_and_clients_with_their_last_use(env: tuple[AccessReviews, MemoryStore, FakeClock, str]) -> None:
    reviews, _store, clock, user_id = env
    campaign = reviews.open_campaign("Q4", clock.ms + 30 * DAY, "u-officer", {f"user:{user_id}": clock.ms - DAY})
    subjects = {(i.kind, i.subject): i for i in campaign.items}
    assert (CLIENT, "fv-1") in subjects and subjects[(CLIENT, "fv-1")].access == "system/*.rs"
    assert subjects[(USER, user_id)].last_used_ms == clock.ms - DAY
    assert subjects[(CLIENT, "fv-1")].last_used_ms is None
    assert campaign.pending == len(campaign.items) == 3 and campaign.status == "open"
    assert [c.campaign_id for c in reviews.campaigns()] == [campaign.campaign_id]
    assert not campaign.overdue(clock.ms)
    clock.ms += 31 * DAY
    assert campaign.overdue(clock.ms)


def test_each_access_is_decided_once_and_the_campaign_completes(env: tuple[AccessReviews, MemoryStore, FakeClock, str]) -> None:
    reviews, _store, clock, _user_id = env
    campaign = reviews.open_campaign("Q4", clock.ms + DAY, "u-officer", {})
    for item in campaign.items:
        _updated, decided = reviews.decide(campaign.campaign_id, item.kind, item.subject, "keep", "still needed",
                                          "u-officer")
        assert decided.decision == "keep" and decided.decided_by == "u-officer"
    stored = reviews.get(campaign.campaign_id)
    assert stored is not None and stored.pending == 0 and stored.status == "closed"
    first = campaign.items[0]
    with pytest.raises(ReviewError, match="already reviewed"):
        reviews.decide(campaign.campaign_id, first.kind, first.subject, "revoke", "changed my mind", "u-officer")


@pytest.mark.parametrize(("kind", "subject", "decision", "message"), [
    (CLIENT, "fv-1", "maybe", "keep or revoke"),
    (CLIENT, "fv-unknown", "keep", "not part"),
])
def test_bad_decisions_are_refused(env: tuple[AccessReviews, MemoryStore, FakeClock, str], kind: str, subject: str,
                                   decision: str, message: str) -> None:
    reviews, _store, clock, _ = env
    campaign = reviews.open_campaign("Q4", clock.ms + DAY, "u-officer", {})
    with pytest.raises(ReviewError, match=message):
        reviews.decide(campaign.campaign_id, kind, subject, decision, "reason", "u-officer")
    with pytest.raises(ReviewError, match="no such campaign"):
        reviews.decide("0badc0de", CLIENT, "fv-1", "keep", "reason", "u-officer")
    assert reviews.get("../index") is None


def test_a_campaign_needs_a_name_and_a_future_due_date(env: tuple[AccessReviews, MemoryStore, FakeClock, str]) -> None:
    reviews, _store, clock, _ = env
    with pytest.raises(ReviewError):
        reviews.open_campaign(" ", clock.ms + DAY, "u", {})
    with pytest.raises(ReviewError):
        reviews.open_campaign("late", clock.ms - 1, "u", {})
