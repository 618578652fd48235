"""What an idle operator's periodic rounds cost with thousands of environments: the policy's admission,
expiry and gauges run every EPHEMERA_POLICY_INTERVAL (5 s) and must not pass over every environment
while nothing changes, yet find all that a full pass would (bench/RESULTS.md, session 6: idle CPU)."""

from __future__ import annotations

import datetime
import random
import time
from collections.abc import Callable
from typing import Any

import pytest

from ephemera.expiry import Expiry
from ephemera.ledger import LIVE, Counts, Entry, Ledger, iso

START = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
TTL = 3600.0
PHASES = [None, "Pending", "Queued", "Provisioning", "Ready", "Updating", "Failed", "Expired", "Destroying"]


def body(
    name: str,
    phase: str | None,
    repository: str = "octo/a",
    *,
    deleting: bool = False,
    uid: str | None = None,
    **status: Any,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "uid": uid or name, "creationTimestamp": iso(START)}
    if deleting:
        meta["deletionTimestamp"] = iso(START)
    return {"metadata": meta, "spec": {"repository": repository}, "status": {"phase": phase, **status}}


def full_pass(ledger: Ledger) -> tuple[Counts, list[str]]:
    """The counts and the queue from a pass over every entry, as the ledger worked them out before it
    kept them."""
    with ledger.lock:
        reserved = ledger.reserved()
        entries = ledger.entries()
        by_repository: dict[str, int] = {}
        live = in_flight = 0
        for entry in entries:
            admitted = entry.name in reserved
            if entry.live or admitted:
                live += 1
                by_repository[entry.repository] = by_repository.get(entry.repository, 0) + 1
            if (entry.phase == "Provisioning" and not entry.deleting) or admitted:
                in_flight += 1
        unseen = reserved - {entry.name for entry in entries}
        for name in unseen:
            repository = ledger._reserved[name][1]
            by_repository[repository] = by_repository.get(repository, 0) + 1
        queue = sorted((entry for entry in entries if entry.queued), key=Entry.order)
        return Counts(live + len(unseen), by_repository, in_flight + len(unseen)), [e.name for e in queue]


def test_the_ledgers_kept_counts_and_queue_match_a_full_pass_through_every_kind_of_change() -> None:
    rng = random.Random(19)
    ledger = Ledger()
    names = [f"env-{i}" for i in range(40)]
    repositories = ["octo/a", "octo/b", "Octo/C"]

    def random_body(name: str) -> dict[str, Any]:
        return body(
            name,
            rng.choice(PHASES),
            rng.choice(repositories),
            deleting=rng.random() < 0.2,
            queuedAt=iso(START + datetime.timedelta(seconds=rng.randrange(100))),
        )

    ledger.prime([random_body(name) for name in names[:20]])
    for step in range(3000):
        action = rng.random()
        name = rng.choice(names)
        if action < 0.55:
            ledger.observe(rng.choice(["ADDED", "MODIFIED"]), random_body(name))
        elif action < 0.7:
            ledger.observe("DELETED", body(name, "Ready"))
        elif action < 0.8:
            ledger.reserve(name, rng.choice(repositories))
        elif action < 0.88:
            ledger.release(name)
        elif action < 0.93:
            ledger.prime([random_body(n) for n in rng.sample(names, 5)])
        else:
            started = time.monotonic()
            listed = [random_body(n) for n in rng.sample(names, rng.randrange(len(names)))]
            ledger.observe("MODIFIED", random_body(name))  # told after the listing began: kept
            ledger.resync(listed, started)
        expected_counts, expected_queue = full_pass(ledger)
        assert ledger.counts() == expected_counts, f"step {step}"
        assert [e.name for e in ledger.queue()] == expected_queue, f"step {step}"


def counting(monkeypatch: pytest.MonkeyPatch, *properties: str) -> list[str]:
    """Count every read of the named Entry properties (what a pass over the entries asks of each)."""
    reads: list[str] = []
    for prop in properties:
        original: Callable[[Entry], bool] = getattr(Entry, prop).fget

        def read(entry: Entry, original: Callable[[Entry], bool] = original, prop: str = prop) -> bool:
            reads.append(prop)
            return original(entry)

        monkeypatch.setattr(Entry, prop, property(read))
    return reads


def test_the_ledgers_counts_and_queue_pass_over_no_settled_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = Ledger()
    ledger.prime([body(f"ready-{i}", "Ready", f"octo/r{i % 7}") for i in range(2000)])
    ledger.prime([body("queued-1", "Queued", queuedAt="2026-01-01T00:00:02Z"), body("queued-2", "Queued")])
    ledger.reserve("queued-2", "octo/q")
    reads = counting(monkeypatch, "live", "queued")
    counts, queue = ledger.counts(), ledger.queue()
    assert (counts.live, counts.in_flight) == (2001, 1)
    assert counts.by_repository["octo/a"] == 1  # the admitted one, under its entry's repository
    assert [e.name for e in queue] == ["queued-2", "queued-1"]
    assert len(reads) <= 2  # the one reservation's entry; not one read per Ready environment


def test_an_expiry_round_with_nothing_changed_reads_no_entry_and_still_finds_what_changes_and_falls_due(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ledger = Ledger()
    ttls = {"octo/a": TTL}
    wanted = {f"env-{i}": iso(START + datetime.timedelta(seconds=i + TTL)) for i in range(1, 500)}
    ledger.prime(
        [
            body(name, "Ready", lastActivityAt=iso(START + datetime.timedelta(seconds=i)), expiresAt=wanted[name])
            for i, name in enumerate(wanted, 1)
        ]
    )
    # The round works from the ledger alone: no service is needed until something expires.
    expiry = Expiry(None, ledger, lambda repository: ttls[repository])  # type: ignore[arg-type]
    passes: list[int] = []
    entries = ledger.own  # the round's pass: over the entries of the objects this operator acts on

    def passing() -> list[Entry]:
        passes.append(1)
        return entries()

    monkeypatch.setattr(ledger, "own", passing)
    now = START + datetime.timedelta(seconds=60)

    assert expiry.round(now) == ([], [])
    assert len(passes) == 1
    for seconds in range(61, 120):  # idle rounds: not one pass
        assert expiry.round(START + datetime.timedelta(seconds=seconds)) == ([], [])
    assert len(passes) == 1

    # A push on one environment (a watch event): the next round passes again and sees it.
    pushed = START + datetime.timedelta(seconds=100)
    ledger.observe("MODIFIED", body("env-7", "Ready", lastActivityAt=iso(pushed), expiresAt=wanted["env-7"]))
    assert expiry.round(now) == ([], [("env-7", iso(pushed + datetime.timedelta(seconds=TTL)))])
    assert len(passes) == 2

    # A TTL changed by a template: every expiresAt is out of date (the round writes at most 100 of them).
    ttls["octo/a"] = TTL / 2
    _, refresh = expiry.round(now)
    assert (len(refresh), len(passes)) == (100, 3)
    ttls["octo/a"] = TTL

    # The clock passing the first expiry: the first environment is due, the others not yet.
    expiring, _ = expiry.round(START + datetime.timedelta(seconds=1 + TTL))
    assert [e.name for e in expiring] == ["env-1"]
    assert all(e.phase in LIVE for e in expiring)
