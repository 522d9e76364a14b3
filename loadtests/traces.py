"""Public request traces as replayable requests (pure file parsing; no Locust, no I/O beyond reading).

The traces in `../shared/traces/` (see its README for sources and licences):

- **Mooncake** conversation trace (JSONL, Apache-2.0, Kimi's FAST'25 release): `timestamp` (ms from the
  start), `input_length`, `output_length`, `hash_ids` (prefix-block ids of 512 tokens: equal leading ids
  are a shared, cacheable prefix);
- **Azure LLM inference trace 2023**, conversation service (CSV, CC-BY 4.0; Patel et al., "Splitwise:
  Efficient generative LLM inference using phase splitting", ISCA 2024): `TIMESTAMP`,
  `ContextTokens`, `GeneratedTokens`.

`read_trace(path)` reads either format (by extension), and any other file of the same shape.
`scale(requests, token_scale, max_input, max_output)` shrinks token counts for small models (the tiny
local models have a 4,096-token context) and keeps the block structure: a Mooncake request keeps its
hash ids, and its scaled block size is `block_tokens × token_scale`.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

#: Tokens per prefix block in the Mooncake trace.
MOONCAKE_BLOCK_TOKENS = 512


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace: when (seconds from the trace's start) and how big."""

    t_s: float
    input_tokens: int
    output_tokens: int
    #: Prefix-block ids (Mooncake); empty when the trace has none.
    hash_ids: tuple[int, ...] = field(default=())


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file, the line and the field."""


def read_mooncake(path: Path) -> list[TraceRequest]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out.append(
                    TraceRequest(
                        float(row["timestamp"]) / 1000.0,
                        int(row["input_length"]),
                        int(row["output_length"]),
                        tuple(int(h) for h in row.get("hash_ids") or ()),
                    )
                )
            except (ValueError, KeyError, TypeError) as e:
                raise TraceError(
                    f"{path}:{n}: {type(e).__name__} {e}; a Mooncake line needs timestamp (ms), "
                    "input_length, output_length and optionally hash_ids"
                ) from None
    return out


def read_azure(path: Path) -> list[TraceRequest]:
    out: list[TraceRequest] = []
    t0: datetime | None = None
    with open(path, newline="") as f:
        for n, row in enumerate(csv.DictReader(f), 2):
            try:
                # Seven fractional digits: more than datetime parses; microseconds are enough.
                stamp = row["TIMESTAMP"].strip()
                head, _, frac = stamp.partition(".")
                ts = datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}" if frac else head)
                t0 = t0 or ts
                out.append(
                    TraceRequest(
                        (ts - t0).total_seconds(), int(row["ContextTokens"]), int(row["GeneratedTokens"])
                    )
                )
            except (ValueError, KeyError, TypeError) as e:
                raise TraceError(
                    f"{path}:{n}: {type(e).__name__} {e}; an Azure trace row needs TIMESTAMP, "
                    "ContextTokens and GeneratedTokens"
                ) from None
    return out


def read_trace(path: str | Path) -> list[TraceRequest]:
    """The requests of a Mooncake (`.jsonl`) or Azure (`.csv`) trace, in arrival order."""
    p = Path(path)
    if p.suffix == ".jsonl":
        reqs = read_mooncake(p)
    elif p.suffix == ".csv":
        reqs = read_azure(p)
    else:
        raise TraceError(f"{p}: unknown trace format; use a Mooncake .jsonl or an Azure .csv")
    return sorted(reqs, key=lambda r: r.t_s)


def scale(
    requests: list[TraceRequest], token_scale: float, max_input: int, max_output: int
) -> list[TraceRequest]:
    """Token counts multiplied by `token_scale` (at least 1 token) and capped at `max_input` /
    `max_output`; a capped Mooncake request keeps only the blocks that still fit."""
    if not 0 < token_scale <= 1:
        raise ValueError(f"token_scale must be in (0, 1], not {token_scale!r}")
    block = MOONCAKE_BLOCK_TOKENS * token_scale
    out = []
    for r in requests:
        inp = min(max_input, max(1, round(r.input_tokens * token_scale)))
        ids = r.hash_ids[: max(0, math.ceil(inp / block))] if r.hash_ids else ()
        out_tokens = min(max_output, max(1, round(r.output_tokens * token_scale)))
        out.append(replace(r, input_tokens=inp, output_tokens=out_tokens, hash_ids=ids))
    return out
