"""Durable, append-only log of background reasoning sessions (groundwork for issue 6).

A session's record (tenant, model, request, status, result) plus two append-only logs:

- **events**: the numbered stream events a client reads (and resumes from, by number);
- **tokens**: the generated token ids, in chunks keyed by the index of their first token, written
  at each checkpoint. Replaying them as prompt resumes a session on another replica.

Appends are idempotent (a chunk or event already stored is ignored, a different one is an error),
so a writer that retries after a crash never duplicates or reorders anything. `SQLiteStore` is the
default (one file, WAL, `synchronous=FULL`: a commit is on disk before it is acknowledged); the
`SessionStore` protocol is what a Redis or Postgres store implements. Calls are blocking: run them in
a thread from an event loop. A store that cannot be reached or does not answer in time raises what
`store_unavailable` recognizes (its own errors, or `StoreUnavailable`): callers retry later, they do
not fail the session.

Ownership: a worker `claim`s an unfinished session for a lease and `renew`s it while it runs; it
writes with `checkpoint` and ends with `finish`, both of which check in the same transaction that it
still holds the session (else `LeaseLost`, and nothing is written). A session whose holder stopped
renewing is an orphan (`orphans`) that another worker may claim, resuming from its checkpoints.
Orphans are offered round-robin across tenants: each tenant's oldest first, and within a round the
tenant a worker claimed for least recently first (`served`, the lease clock of its last claim), so one
tenant's queue does not hold back another's sessions, even for a worker with one free slot.
A client's `request_cancel` raises a flag the holder sees through `cancels`; a session nobody holds
is cancelled on the spot.

Outbox: a store opened with `webhook_tenants` records, in the same transaction that gives one of those
tenants' sessions its finished status (`finish`, `set_status`, or `request_cancel` cancelling it on
the spot), an `OutboxEntry` — the completion webhook still to deliver, under its stable event id
(`completion_event_id`). Deliverers (serving.sessions.webhooks.CompletionNotifier) `outbox_claim`
entries under a lease, `outbox_renew` it while they deliver and `outbox_remove` an entry once it is
delivered or given up on, so a worker that dies between the finish and the delivery leaves the entry
for another one to deliver (at least once).
"""

from __future__ import annotations

import json
import sqlite3
import sys
import threading
import time
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from serving.sessions.webhooks import completion_event_id


class Status(StrEnum):
    """A session's state: queued → in_progress → completed | incomplete | failed | cancelled."""

    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    INCOMPLETE = "incomplete"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """Whether the session will not change any more."""
        return self not in (Status.QUEUED, Status.IN_PROGRESS)


class StoreError(Exception):
    """A write that would break the log (a gap, or different data at a stored position)."""


class QuotaExceeded(StoreError):
    """The tenant holds as many unfinished sessions (or bytes) as it may."""


class LeaseLost(StoreError):
    """The writer no longer holds the session (another owner claimed it, or it is finished or gone)."""


class StoreUnavailable(Exception):
    """The store could not be reached or did not answer in time (whether a write landed is unknown).

    For custom stores; SQLite's and Redis's own errors are recognized as they are (`store_unavailable`)."""


def store_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the store is unreachable or too slow for now (a later call may work), as
    opposed to a refused write or a bug: StoreUnavailable, OSError (ConnectionError, TimeoutError),
    SQLite's OperationalError (`database is locked` past the busy timeout, a disk I/O error), and
    redis-py's connection (incl. loading), timeout, read-only (a failover), cluster-down and
    try-again errors."""
    if isinstance(exc, StoreUnavailable | OSError | sqlite3.OperationalError):
        return True
    errors = sys.modules.get("redis.exceptions")  # only ever raised once redis-py is imported
    if errors is None:
        return False
    transient = (
        errors.ConnectionError, errors.TimeoutError, errors.ReadOnlyError, errors.ClusterDownError,
        errors.TryAgainError,
    )  # fmt: skip
    return isinstance(exc, transient)


@dataclass(slots=True)
class SessionRecord:
    """A session's row."""

    id: str
    tenant: str
    model: str
    request: dict[str, Any]
    status: Status = Status.QUEUED
    created: float = field(default_factory=time.time)
    updated: float = 0.0
    expires: float = 0.0
    result: dict[str, Any] | None = None
    owner: str | None = None
    lease_until: float = 0.0
    cancel_requested: bool = False
    claims: int = 0


@dataclass(frozen=True, slots=True)
class SessionHead:
    """What a reader polls: a session's tenant and status, without its request or result (which can
    be megabytes of JSON for a long prompt)."""

    tenant: str
    status: Status


@dataclass(frozen=True, slots=True)
class Event:
    """One stream event: its number in the session, its type, and its payload."""

    seq: int
    type: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A completion webhook still to deliver: session `response_id` of `tenant` reached `status` at
    `created`. `attempts` counts its claims (this one included); `claimed_by` holds it until
    `lease_until` (store clock), after which another deliverer may claim it."""

    event_id: str
    response_id: str
    tenant: str
    status: Status
    created: float
    attempts: int = 0
    claimed_by: str | None = None
    lease_until: float = 0.0


class SessionStore(Protocol):
    """What a session store provides (SQLite here; Redis/Postgres for clusters)."""

    def create(self, rec: SessionRecord) -> None: ...
    def get(self, session_id: str, tenant: str) -> SessionRecord | None: ...
    def get_any(self, session_id: str) -> SessionRecord | None: ...
    def head(self, session_id: str) -> SessionHead | None: ...
    def set_status(self, session_id: str, status: Status, result: dict[str, Any] | None = None) -> None: ...
    def append_events(self, session_id: str, events: list[Event]) -> None: ...
    def events(self, session_id: str, after: int = -1) -> list[Event]: ...
    def last_seq(self, session_id: str) -> int: ...
    def append_tokens(self, session_id: str, start: int, ids: list[int]) -> None: ...
    def tokens(self, session_id: str) -> list[int]: ...
    def delete(self, session_id: str, tenant: str) -> bool: ...
    def purge_expired(self, now: float | None = None) -> int: ...
    def claim(
        self, session_id: str, owner: str, lease_s: float, now: float | None = None
    ) -> SessionRecord | None: ...
    def renew(
        self, owner: str, session_ids: Iterable[str], lease_s: float, now: float | None = None
    ) -> set[str]: ...
    def orphans(self, now: float | None = None, limit: int = 100) -> list[str]: ...
    def request_cancel(
        self, session_id: str, tenant: str, now: float | None = None
    ) -> SessionRecord | None: ...
    def cancels(self, owner: str) -> set[str]: ...
    def checkpoint(
        self, session_id: str, owner: str, token_start: int, token_ids: list[int], events: list[Event]
    ) -> None: ...
    def finish(
        self,
        session_id: str,
        owner: str,
        status: Status,
        result: dict[str, Any] | None,
        events: list[Event],
    ) -> None: ...


class OutboxStore(Protocol):
    """A store that keeps an outbox of completion webhooks (SQLiteStore and RedisStore do)."""

    webhook_tenants: frozenset[str]

    def outbox_claim(
        self,
        owner: str,
        lease_s: float,
        grace_s: float = 0.0,
        limit: int = 100,
        event_ids: Iterable[str] | None = None,
        now: float | None = None,
    ) -> list[OutboxEntry]: ...
    def outbox_renew(
        self, owner: str, event_ids: Iterable[str], lease_s: float, now: float | None = None
    ) -> set[str]: ...
    def outbox_remove(self, event_id: str, owner: str) -> bool: ...
    def outbox(self, limit: int = -1) -> list[OutboxEntry]: ...


def head_of(store: SessionStore, session_id: str) -> SessionHead | None:
    """`store.head(session_id)`, or the same read from the whole record for a custom store written
    before `head` existed."""
    head = getattr(store, "head", None)
    if head is not None:
        return head(session_id)
    rec = store.get_any(session_id)
    return None if rec is None else SessionHead(rec.tenant, rec.status)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, model TEXT NOT NULL, status TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, expires REAL NOT NULL,
    request TEXT NOT NULL, result TEXT, bytes INTEGER NOT NULL DEFAULT 0,
    owner TEXT, lease_until REAL NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0,
    claims INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_tenant ON sessions (tenant, created);
CREATE INDEX IF NOT EXISTS sessions_status ON sessions (status, created);
CREATE TABLE IF NOT EXISTS events (
    session_id TEXT NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
);
CREATE TABLE IF NOT EXISTS tokens (
    session_id TEXT NOT NULL, start INTEGER NOT NULL, ids BLOB NOT NULL,
    PRIMARY KEY (session_id, start)
);
CREATE TABLE IF NOT EXISTS tenants (tenant TEXT PRIMARY KEY, served REAL NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    event_id TEXT PRIMARY KEY, response_id TEXT NOT NULL, tenant TEXT NOT NULL, status TEXT NOT NULL,
    created REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, claimed_by TEXT,
    lease_until REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_created ON outbox (created);
"""

# Ownership columns, added to a file written before they existed (CREATE TABLE IF NOT EXISTS keeps it).
_OWNERSHIP_COLUMNS = {
    "owner": "TEXT",
    "lease_until": "REAL NOT NULL DEFAULT 0",
    "cancel_requested": "INTEGER NOT NULL DEFAULT 0",
    "claims": "INTEGER NOT NULL DEFAULT 0",
}
_INDEXES = "CREATE INDEX IF NOT EXISTS sessions_owner ON sessions (owner);"

_RECORD_COLUMNS = (
    "id, tenant, model, request, status, created, updated, expires, result, "
    "owner, lease_until, cancel_requested, claims"
)
_OUTBOX_COLUMNS = "event_id, response_id, tenant, status, created, attempts, claimed_by, lease_until"
_UNFINISHED = (Status.QUEUED.value, Status.IN_PROGRESS.value)
_UNFINISHED_SQL = "status IN (?, ?)"
_MAX_VARS = 500  # ids bound in one statement (SQLite's limit is 999 on old builds)


def _pack(ids: list[int]) -> bytes:
    return array("q", ids).tobytes()


def _unpack(blob: bytes) -> list[int]:
    a = array("q")
    a.frombytes(blob)
    return a.tolist()


def _record(row: tuple[Any, ...]) -> SessionRecord:
    return SessionRecord(
        row[0], row[1], row[2], json.loads(row[3]), Status(row[4]), row[5], row[6], row[7],
        json.loads(row[8]) if row[8] else None, row[9], row[10], bool(row[11]), row[12],
    )  # fmt: skip


def _outbox_entry(row: tuple[Any, ...]) -> OutboxEntry:
    return OutboxEntry(row[0], row[1], row[2], Status(row[3]), row[4], row[5], row[6], row[7])


class SQLiteStore:
    """Sessions in one SQLite file.

    Args:
        path: the database file (created with its directory).
        ttl_s: how long a session is kept after it was created.
        max_sessions_per_tenant: sessions a tenant may hold; the oldest finished ones are evicted
            to make room, and a tenant whose sessions are all unfinished gets QuotaExceeded.
        max_bytes_per_tenant: the same bound on the bytes of a tenant's logs.
        webhook_tenants: tenants with a completion webhook: their sessions' ends are recorded in
            the outbox (sessions.webhooks).
    """

    def __init__(
        self,
        path: str | Path,
        ttl_s: float,
        max_sessions_per_tenant: int,
        max_bytes_per_tenant: int,
        webhook_tenants: Iterable[str] = (),
    ) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(p, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: with WAL, NORMAL may roll back a committed transaction on a power loss or an OS crash,
        # i.e. lose an acknowledged create (its id then answers 404) or finish (the session runs again).
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        have = {r[1] for r in self._db.execute("PRAGMA table_info(sessions)")}
        for name, decl in _OWNERSHIP_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE sessions ADD COLUMN {name} {decl}")
        self._db.executescript(_INDEXES)
        self._lock = threading.Lock()
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions_per_tenant
        self.max_bytes = max_bytes_per_tenant
        self.webhook_tenants = frozenset(webhook_tenants)

    def close(self) -> None:
        """Close the database (after any call in flight in another thread)."""
        with self._lock:
            self._db.close()

    # -- sessions ---------------------------------------------------------------------------------

    def create(self, rec: SessionRecord) -> None:
        """Store a new session, evicting the tenant's oldest finished ones if it is over a bound."""
        now = time.time()
        rec.updated = now
        rec.expires = rec.created + self.ttl_s
        request = json.dumps(rec.request)
        with self._lock, self._tx():
            self._make_room(rec.tenant, len(request))
            self._db.execute(
                "INSERT INTO sessions (id, tenant, model, status, created, updated, expires, request, bytes) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (rec.id, rec.tenant, rec.model, rec.status.value, rec.created, now, rec.expires, request,
                 len(request)),
            )  # fmt: skip

    def _make_room(self, tenant: str, new_bytes: int) -> None:
        rows = self._db.execute(
            "SELECT id, status, bytes FROM sessions WHERE tenant = ? ORDER BY created", (tenant,)
        ).fetchall()
        count, size = len(rows), sum(r[2] for r in rows)
        for sid, status, nbytes in rows:
            if count < self.max_sessions and size + new_bytes <= self.max_bytes:
                return
            if Status(status).finished:
                self._delete(sid)
                count, size = count - 1, size - nbytes
        if count >= self.max_sessions or size + new_bytes > self.max_bytes:
            raise QuotaExceeded(
                f"tenant {tenant!r} holds {count} unfinished sessions ({size} bytes); "
                f"the bounds are {self.max_sessions} sessions and {self.max_bytes} bytes"
            )

    def get(self, session_id: str, tenant: str) -> SessionRecord | None:
        """The session, or None if it does not exist or belongs to another tenant."""
        with self._lock:
            return self._get(session_id, tenant)

    def get_any(self, session_id: str) -> SessionRecord | None:
        """The session whatever its tenant (for workers, never for clients), or None."""
        with self._lock:
            return self._get(session_id)

    def _get(self, session_id: str, tenant: str | None = None) -> SessionRecord | None:
        query = f"SELECT {_RECORD_COLUMNS} FROM sessions WHERE id = ?"  # noqa: S608
        args: tuple[str, ...] = (session_id,)
        if tenant is not None:
            query, args = query + " AND tenant = ?", (session_id, tenant)
        row = self._db.execute(query, args).fetchone()
        return None if row is None else _record(row)

    def head(self, session_id: str) -> SessionHead | None:
        """The session's tenant and status (for a reader's polls; None if it does not exist)."""
        with self._lock:
            row = self._db.execute(
                "SELECT tenant, status FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
        return None if row is None else SessionHead(row[0], Status(row[1]))

    def set_status(self, session_id: str, status: Status, result: dict[str, Any] | None = None) -> None:
        """Move a session to `status` (a finished session does not change again)."""
        with self._lock, self._tx():
            row = self._db.execute("SELECT status FROM sessions WHERE id = ?", (session_id,)).fetchone()
            if row is None:
                raise StoreError(f"no session {session_id}")
            if Status(row[0]).finished and Status(row[0]) is not status:
                raise StoreError(f"session {session_id} is already {row[0]}")
            blob = json.dumps(result) if result is not None else None
            self._db.execute(
                "UPDATE sessions SET status = ?, result = COALESCE(?, result), updated = ?, "
                "bytes = bytes + ? WHERE id = ?",
                (status.value, blob, time.time(), len(blob or ""), session_id),
            )
            if status.finished and not Status(row[0]).finished:
                self._outbox_add(session_id, status)

    def delete(self, session_id: str, tenant: str) -> bool:
        """Delete the tenant's session and its logs; False if it has none by that id."""
        with self._lock, self._tx():
            row = self._db.execute(
                "SELECT 1 FROM sessions WHERE id = ? AND tenant = ?", (session_id, tenant)
            ).fetchone()
            if row is None:
                return False
            self._delete(session_id)
            return True

    def _delete(self, session_id: str) -> None:
        for table, key in (("events", "session_id"), ("tokens", "session_id"), ("sessions", "id")):
            self._db.execute(f"DELETE FROM {table} WHERE {key} = ?", (session_id,))  # noqa: S608

    def purge_expired(self, now: float | None = None) -> int:
        """Delete finished sessions past their TTL; returns how many."""
        now = time.time() if now is None else now
        finished = [s.value for s in Status if s.finished]
        with self._lock, self._tx():
            marks = ",".join("?" * len(finished))
            query = f"SELECT id FROM sessions WHERE expires < ? AND status IN ({marks})"  # noqa: S608
            ids = [r[0] for r in self._db.execute(query, (now, *finished))]
            for sid in ids:
                self._delete(sid)
        return len(ids)

    # -- logs -------------------------------------------------------------------------------------

    def append_events(self, session_id: str, events: list[Event]) -> None:
        """Append events numbered from the next free number; ones already stored (same number and
        payload) are skipped, so a retried append is harmless. Nothing is written for a session that
        does not exist (deleted while a cancel was writing its end: no row is left behind)."""
        if not events:
            return
        with self._lock, self._tx():
            if self._exists(session_id):
                self._append_events(session_id, events)

    def _exists(self, session_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone() is not None

    def _append_events(self, session_id: str, events: list[Event]) -> None:
        """`append_events` inside the caller's transaction (an error leaves it to roll back)."""
        if not events:
            return
        last = self._last_seq(session_id)
        added = 0
        for ev in events:
            data = json.dumps(ev.data)
            if ev.seq <= last:
                row = self._db.execute(
                    "SELECT type, data FROM events WHERE session_id = ? AND seq = ?", (session_id, ev.seq)
                ).fetchone()
                if row != (ev.type, data):
                    raise StoreError(f"event {ev.seq} of {session_id} differs from the stored one")
                continue
            if ev.seq != last + 1:
                raise StoreError(f"event {ev.seq} of {session_id} leaves a gap after {last}")
            self._db.execute("INSERT INTO events VALUES (?, ?, ?, ?)", (session_id, ev.seq, ev.type, data))
            last, added = ev.seq, added + len(data)
        self._db.execute("UPDATE sessions SET bytes = bytes + ? WHERE id = ?", (added, session_id))

    def _last_seq(self, session_id: str) -> int:
        return self._db.execute(
            "SELECT COALESCE(MAX(seq), -1) FROM events WHERE session_id = ?", (session_id,)
        ).fetchone()[0]

    def events(self, session_id: str, after: int = -1) -> list[Event]:
        """Events numbered after `after`, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, type, data FROM events WHERE session_id = ? AND seq > ? ORDER BY seq",
                (session_id, after),
            ).fetchall()
        return [Event(r[0], r[1], json.loads(r[2])) for r in rows]

    def last_seq(self, session_id: str) -> int:
        """The number of the session's last stored event; -1 when it has none."""
        with self._lock:
            return self._last_seq(session_id)

    def append_tokens(self, session_id: str, start: int, ids: list[int]) -> None:
        """A checkpoint: generated ids[start:start+len(ids)]. It must continue the stored ids exactly;
        a chunk already stored with the same ids is skipped. Nothing is written for a session that does
        not exist."""
        if not ids:
            return
        with self._lock, self._tx():
            if self._exists(session_id):
                self._append_tokens(session_id, start, ids)

    def _append_tokens(self, session_id: str, start: int, ids: list[int]) -> None:
        """`append_tokens` inside the caller's transaction (an error leaves it to roll back)."""
        if not ids:
            return
        blob = _pack(ids)
        have = self._count_tokens(session_id)
        if start < have:
            row = self._db.execute(
                "SELECT ids FROM tokens WHERE session_id = ? AND start = ?", (session_id, start)
            ).fetchone()
            if row is None or row[0] != blob:
                raise StoreError(f"tokens at {start} of {session_id} differ from the stored ones")
            return
        if start != have:
            raise StoreError(f"tokens at {start} of {session_id} leave a gap after {have}")
        self._db.execute("INSERT INTO tokens VALUES (?, ?, ?)", (session_id, start, blob))
        self._db.execute("UPDATE sessions SET bytes = bytes + ? WHERE id = ?", (len(blob), session_id))

    def _count_tokens(self, session_id: str) -> int:
        row = self._db.execute(
            "SELECT start, LENGTH(ids) FROM tokens WHERE session_id = ? ORDER BY start DESC LIMIT 1",
            (session_id,),
        ).fetchone()
        return 0 if row is None else row[0] + row[1] // 8

    def tokens(self, session_id: str) -> list[int]:
        """Every generated id checkpointed so far, in order."""
        out: list[int] = []
        with self._lock:
            rows = self._db.execute(
                "SELECT ids FROM tokens WHERE session_id = ? ORDER BY start", (session_id,)
            ).fetchall()
        for (blob,) in rows:
            out.extend(_unpack(blob))
        return out

    # -- ownership ----------------------------------------------------------------------------------

    def claim(
        self, session_id: str, owner: str, lease_s: float, now: float | None = None
    ) -> SessionRecord | None:
        """Take an unfinished session for `lease_s` seconds: one nobody holds, one whose lease ran out
        (before `now`), or one `owner` already holds (which just extends its lease). A queued session
        moves to in_progress; `claims` counts the times it changed hands, and a change of hands marks
        the tenant served at `now` (for the order of `orphans`). Returns the updated record, or None if
        the session is missing, finished, or held by another owner."""
        now = time.time() if now is None else now
        with self._lock, self._tx():
            row = self._db.execute(
                "SELECT status, owner, lease_until, tenant FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()
            if row is None or Status(row[0]).finished:
                return None
            holder, lease_until = row[1], row[2]
            live = holder is not None and lease_until >= now
            if live and holder != owner:
                return None
            self._db.execute(
                "UPDATE sessions SET owner = ?, lease_until = ?, claims = claims + ?, status = ?, "
                "updated = ? WHERE id = ?",
                (owner, now + lease_s, 0 if live else 1, Status.IN_PROGRESS.value, time.time(), session_id),
            )
            if not live:
                self._db.execute(
                    "INSERT INTO tenants VALUES (?, ?) "
                    "ON CONFLICT (tenant) DO UPDATE SET served = MAX(served, excluded.served)",
                    (row[3], now),
                )
            return self._get(session_id)

    def renew(
        self, owner: str, session_ids: Iterable[str], lease_s: float, now: float | None = None
    ) -> set[str]:
        """Extend to `now + lease_s` the leases of those of `session_ids` that `owner` still holds
        (unfinished, not claimed by another); returns their ids — the others were lost."""
        now = time.time() if now is None else now
        ids = list(dict.fromkeys(session_ids))
        held: set[str] = set()
        with self._lock, self._tx():
            for i in range(0, len(ids), _MAX_VARS):
                chunk = ids[i : i + _MAX_VARS]
                where = f"owner = ? AND {_UNFINISHED_SQL} AND id IN ({','.join('?' * len(chunk))})"
                args = (owner, *_UNFINISHED, *chunk)
                held.update(r[0] for r in self._db.execute(f"SELECT id FROM sessions WHERE {where}", args))  # noqa: S608
                self._db.execute(f"UPDATE sessions SET lease_until = ? WHERE {where}", (now + lease_s, *args))  # noqa: S608
        return held

    def orphans(self, now: float | None = None, limit: int = 100) -> list[str]:
        """Ids of unfinished sessions nobody holds (no owner, or a lease that ran out before `now`), the
        ones a worker should claim, round-robin across tenants: every tenant's oldest (by created, id),
        then every tenant's second oldest, and so on; within a round the tenants least recently served
        (a claim of theirs changed hands) first, never served first, ties by created and id. A tenant
        that queued a thousand sessions does not hold back another tenant's one. `limit` < 0: all."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT o.id FROM (SELECT id, tenant, created, "
                "ROW_NUMBER() OVER (PARTITION BY tenant ORDER BY created, id) AS turn FROM sessions "
                f"WHERE {_UNFINISHED_SQL} AND (owner IS NULL OR lease_until < ?)) AS o "  # noqa: S608
                "LEFT JOIN tenants AS t ON t.tenant = o.tenant "
                "ORDER BY o.turn, t.served IS NOT NULL, t.served, o.created, o.id LIMIT ?",
                (*_UNFINISHED, now, limit),
            ).fetchall()
        return [r[0] for r in rows]

    def request_cancel(self, session_id: str, tenant: str, now: float | None = None) -> SessionRecord | None:
        """Ask for the tenant's session to be cancelled; None if it has none by that id.

        An unfinished session gets `cancel_requested`, which its holder sees through `cancels`. One no
        worker will pick up to see it — unowned and still queued, or held under a lease that ran out
        before `now` — is cancelled here (status cancelled, no owner). A finished session is left as it
        is. Returns the updated record."""
        now = time.time() if now is None else now
        with self._lock, self._tx():
            rec = self._get(session_id, tenant)
            if rec is None or rec.status.finished:
                return rec
            unheld = (rec.owner is None and rec.status is Status.QUEUED) or (
                rec.owner is not None and rec.lease_until < now
            )
            if unheld:
                self._db.execute(
                    "UPDATE sessions SET cancel_requested = 1, status = ?, owner = NULL, lease_until = 0, "
                    "updated = ? WHERE id = ?",
                    (Status.CANCELLED.value, time.time(), session_id),
                )
                self._outbox_add(session_id, Status.CANCELLED)
            else:
                self._db.execute(
                    "UPDATE sessions SET cancel_requested = 1, updated = ? WHERE id = ?",
                    (time.time(), session_id),
                )
            return self._get(session_id)

    def cancels(self, owner: str) -> set[str]:
        """Ids of the unfinished sessions `owner` holds whose cancellation was requested."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT id FROM sessions WHERE owner = ? AND cancel_requested = 1 AND {_UNFINISHED_SQL}",  # noqa: S608
                (owner, *_UNFINISHED),
            ).fetchall()
        return {r[0] for r in rows}

    def checkpoint(
        self, session_id: str, owner: str, token_start: int, token_ids: list[int], events: list[Event]
    ) -> None:
        """Append a token chunk (as `append_tokens`; no ids, no token write) and events (as
        `append_events`) in one transaction, if `owner` still holds the session; else raise LeaseLost
        and write nothing. A StoreError from either append also writes nothing."""
        with self._lock, self._tx():
            self._check_owner(session_id, owner)
            self._append_tokens(session_id, token_start, token_ids)
            self._append_events(session_id, events)

    def finish(
        self,
        session_id: str,
        owner: str,
        status: Status,
        result: dict[str, Any] | None,
        events: list[Event],
    ) -> None:
        """End a session `owner` holds, in one transaction: append `events`, set the finished
        `status` (ValueError for an unfinished one) and `result` (None keeps the stored one), and
        release it. LeaseLost, and nothing written, if `owner` no longer holds it."""
        status = Status(status)
        if not status.finished:
            raise ValueError(f"finish needs a finished status, not {status.value}")
        blob = json.dumps(result) if result is not None else None
        with self._lock, self._tx():
            self._check_owner(session_id, owner)
            self._append_events(session_id, events)
            self._db.execute(
                "UPDATE sessions SET status = ?, result = COALESCE(?, result), owner = NULL, "
                "lease_until = 0, updated = ?, bytes = bytes + ? WHERE id = ?",
                (status.value, blob, time.time(), len(blob or ""), session_id),
            )
            self._outbox_add(session_id, status)

    def _check_owner(self, session_id: str, owner: str) -> None:
        row = self._db.execute("SELECT status, owner FROM sessions WHERE id = ?", (session_id,)).fetchone()
        if row is None:
            raise LeaseLost(f"no session {session_id}")
        if row[1] != owner or Status(row[0]).finished:
            raise LeaseLost(f"{owner} does not hold session {session_id} ({row[0]}, held by {row[1]})")

    # -- outbox -------------------------------------------------------------------------------------

    def _outbox_add(self, session_id: str, status: Status) -> None:
        """Record the completion webhook of `session_id` reaching `status`, inside the caller's
        transaction, if its tenant has a webhook (an entry already there for that end stays as it is)."""
        if not self.webhook_tenants:
            return
        row = self._db.execute("SELECT tenant FROM sessions WHERE id = ?", (session_id,)).fetchone()
        if row is None or row[0] not in self.webhook_tenants:
            return
        self._db.execute(
            "INSERT OR IGNORE INTO outbox (event_id, response_id, tenant, status, created) "
            "VALUES (?, ?, ?, ?, ?)",
            (completion_event_id(session_id, status.value), session_id, row[0], status.value, time.time()),
        )

    def outbox_claim(
        self,
        owner: str,
        lease_s: float,
        grace_s: float = 0.0,
        limit: int = 100,
        event_ids: Iterable[str] | None = None,
        now: float | None = None,
    ) -> list[OutboxEntry]:
        """Claim outbox entries for `lease_s` seconds and return them (attempts counted, this claim
        included): with `event_ids`, those of them nobody holds (unclaimed, or a lease that ran out
        before `now`); else up to `limit`, oldest first, of the unclaimed ones older than `grace_s`
        and the ones whose lease ran out. An entry another deliverer holds is never returned."""
        ids = [] if event_ids is None else list(dict.fromkeys(event_ids))[:_MAX_VARS]
        if (event_ids is not None and not ids) or limit == 0:
            return []
        now = time.time() if now is None else now
        with self._lock, self._tx():
            if event_ids is None:
                rows = self._db.execute(
                    f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE (claimed_by IS NULL AND created <= ?) "  # noqa: S608
                    "OR (claimed_by IS NOT NULL AND lease_until < ?) ORDER BY created, event_id LIMIT ?",
                    (now - grace_s, now, limit),
                ).fetchall()
            else:
                rows = self._db.execute(
                    f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE event_id IN ({','.join('?' * len(ids))}) "  # noqa: S608
                    "AND (claimed_by IS NULL OR lease_until < ?) ORDER BY created, event_id",
                    (*ids, now),
                ).fetchall()
            out = []
            for row in rows:
                self._db.execute(
                    "UPDATE outbox SET claimed_by = ?, lease_until = ?, attempts = attempts + 1 "
                    "WHERE event_id = ?",
                    (owner, now + lease_s, row[0]),
                )
                out.append(_outbox_entry((*row[:5], row[5] + 1, owner, now + lease_s)))
        return out

    def outbox_renew(
        self, owner: str, event_ids: Iterable[str], lease_s: float, now: float | None = None
    ) -> set[str]:
        """Extend to `now + lease_s` the leases of those of `event_ids` that `owner` still holds;
        returns their ids (the others were delivered, or another deliverer took them over)."""
        now = time.time() if now is None else now
        ids = list(dict.fromkeys(event_ids))
        held: set[str] = set()
        with self._lock, self._tx():
            for i in range(0, len(ids), _MAX_VARS):
                chunk = ids[i : i + _MAX_VARS]
                where = f"claimed_by = ? AND event_id IN ({','.join('?' * len(chunk))})"
                rows = self._db.execute(f"SELECT event_id FROM outbox WHERE {where}", (owner, *chunk))  # noqa: S608
                held.update(r[0] for r in rows)
                until = now + lease_s
                self._db.execute(f"UPDATE outbox SET lease_until = ? WHERE {where}", (until, owner, *chunk))  # noqa: S608
        return held

    def outbox_remove(self, event_id: str, owner: str) -> bool:
        """Remove an entry `owner` holds (delivered, or given up on); False if it does not hold it."""
        with self._lock, self._tx():
            cur = self._db.execute(
                "DELETE FROM outbox WHERE event_id = ? AND claimed_by = ?", (event_id, owner)
            )
            return cur.rowcount > 0

    def outbox(self, limit: int = -1) -> list[OutboxEntry]:
        """The entries still to deliver, oldest first (for tests and operators; `limit` < 0: all)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox ORDER BY created, event_id LIMIT ?",  # noqa: S608
                (limit,),
            ).fetchall()
        return [_outbox_entry(r) for r in rows]

    def _tx(self) -> Any:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT (ROLLBACK on error), for autocommit connections."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
