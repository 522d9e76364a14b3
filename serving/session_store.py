"""Durable, append-only log of background reasoning sessions (groundwork for issue 6).

A session's record (tenant, model, request, status, result) plus two append-only logs:

- **events**: the numbered stream events a client reads (and resumes from, by number);
- **tokens**: the generated token ids, in chunks keyed by the index of their first token, written
  at each checkpoint. Replaying them as prompt resumes a session on another replica.

Appends are idempotent (a chunk or event already stored is ignored, a different one is an error),
so a writer that retries after a crash never duplicates or reorders anything. `SQLiteStore` is the
default (one file, WAL); the `SessionStore` protocol is what a Redis or Postgres store implements.
Calls are blocking: run them in a thread from an event loop.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from array import array
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol


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


@dataclass(frozen=True, slots=True)
class Event:
    """One stream event: its number in the session, its type, and its payload."""

    seq: int
    type: str
    data: dict[str, Any]


class SessionStore(Protocol):
    """What a session store provides (SQLite here; Redis/Postgres for clusters)."""

    def create(self, rec: SessionRecord) -> None: ...
    def get(self, session_id: str, tenant: str) -> SessionRecord | None: ...
    def set_status(self, session_id: str, status: Status, result: dict[str, Any] | None = None) -> None: ...
    def append_events(self, session_id: str, events: list[Event]) -> None: ...
    def events(self, session_id: str, after: int = -1) -> list[Event]: ...
    def append_tokens(self, session_id: str, start: int, ids: list[int]) -> None: ...
    def tokens(self, session_id: str) -> list[int]: ...
    def delete(self, session_id: str, tenant: str) -> bool: ...
    def purge_expired(self, now: float | None = None) -> int: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, model TEXT NOT NULL, status TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, expires REAL NOT NULL,
    request TEXT NOT NULL, result TEXT, bytes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_tenant ON sessions (tenant, created);
CREATE TABLE IF NOT EXISTS events (
    session_id TEXT NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
);
CREATE TABLE IF NOT EXISTS tokens (
    session_id TEXT NOT NULL, start INTEGER NOT NULL, ids BLOB NOT NULL,
    PRIMARY KEY (session_id, start)
);
"""


def _pack(ids: list[int]) -> bytes:
    return array("q", ids).tobytes()


def _unpack(blob: bytes) -> list[int]:
    a = array("q")
    a.frombytes(blob)
    return a.tolist()


class SQLiteStore:
    """Sessions in one SQLite file.

    Args:
        path: the database file (created with its directory).
        ttl_s: how long a session is kept after it was created.
        max_sessions_per_tenant: sessions a tenant may hold; the oldest finished ones are evicted
            to make room, and a tenant whose sessions are all unfinished gets QuotaExceeded.
        max_bytes_per_tenant: the same bound on the bytes of a tenant's logs.
    """

    def __init__(
        self, path: str | Path, ttl_s: float, max_sessions_per_tenant: int, max_bytes_per_tenant: int
    ) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(p, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions_per_tenant
        self.max_bytes = max_bytes_per_tenant

    def close(self) -> None:
        """Close the database."""
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
                "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
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
            row = self._db.execute(
                "SELECT id, tenant, model, request, status, created, updated, expires, result "
                "FROM sessions WHERE id = ? AND tenant = ?",
                (session_id, tenant),
            ).fetchone()
        if row is None:
            return None
        return SessionRecord(
            row[0], row[1], row[2], json.loads(row[3]), Status(row[4]), row[5], row[6], row[7],
            json.loads(row[8]) if row[8] else None,
        )  # fmt: skip

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
        payload) are skipped, so a retried append is harmless."""
        if not events:
            return
        with self._lock, self._tx():
            last = self._db.execute(
                "SELECT COALESCE(MAX(seq), -1) FROM events WHERE session_id = ?", (session_id,)
            ).fetchone()[0]
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
                self._db.execute(
                    "INSERT INTO events VALUES (?, ?, ?, ?)", (session_id, ev.seq, ev.type, data)
                )
                last, added = ev.seq, added + len(data)
            self._db.execute("UPDATE sessions SET bytes = bytes + ? WHERE id = ?", (added, session_id))

    def events(self, session_id: str, after: int = -1) -> list[Event]:
        """Events numbered after `after`, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, type, data FROM events WHERE session_id = ? AND seq > ? ORDER BY seq",
                (session_id, after),
            ).fetchall()
        return [Event(r[0], r[1], json.loads(r[2])) for r in rows]

    def append_tokens(self, session_id: str, start: int, ids: list[int]) -> None:
        """A checkpoint: generated ids[start:start+len(ids)]. It must continue the stored ids exactly;
        a chunk already stored with the same ids is skipped."""
        if not ids:
            return
        blob = _pack(ids)
        with self._lock, self._tx():
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
