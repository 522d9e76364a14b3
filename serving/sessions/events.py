"""A session's OpenAI Responses objects and its numbered stream events (serving.sessions.worker runs sessions;
this module only shapes what they store and what readers see).

Events follow the OpenAI Responses streaming format (`response.created`, `response.output_item.added`,
`response.output_text.delta`, … `response.completed`), numbered by `sequence_number`. Reasoning is
hidden by default: the reasoning item carries no text unless the request asked for `summary`
("full": the whole reasoning, streamed as `response.reasoning_text.delta`; "auto" / "concise" /
"detailed": an extractive summary, its first and last sentences, sent when the reasoning ends).
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Any

from serving.sessions.request import SessionRequest
from serving.sessions.store import Event, SessionRecord, Status

#: Event types that end a session's stream.
TERMINAL_EVENTS = frozenset(
    {"response.completed", "response.incomplete", "response.failed", "response.cancelled"}
)


class SummaryMode(StrEnum):
    """`reasoning.summary` of a Responses request: what a reader sees of the reasoning (none if unset)."""

    AUTO = "auto"
    CONCISE = "concise"
    DETAILED = "detailed"
    FULL = "full"


#: `reasoning.summary` values that ask for an extractive summary, and its length in characters.
_SUMMARY_CHARS = {SummaryMode.AUTO: 400, SummaryMode.CONCISE: 200, SummaryMode.DETAILED: 1000}
SUMMARY_MODES = frozenset(_SUMMARY_CHARS)


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


# -- response objects -------------------------------------------------------------------------------


def response_object(rec: SessionRecord, status: Status | None = None) -> dict[str, Any]:
    """The OpenAI `response` object of a session: its stored result once finished, else the request
    echoed with the current status and no output yet."""
    st = status or rec.status
    if rec.result is not None and (status is None or status is rec.status):
        return rec.result
    r = SessionRequest.from_dict(rec.request)
    return {
        "id": rec.id,
        "object": "response",
        "created_at": int(rec.created),
        "status": st.value,
        "background": r.background,
        "model": rec.model,
        "instructions": r.instructions,
        "max_output_tokens": r.max_output_tokens_asked,
        "metadata": r.metadata,
        "previous_response_id": r.previous_response_id,
        "reasoning": r.reasoning,
        "temperature": r.sampling.get("temperature"),
        "top_p": r.sampling.get("top_p"),
        "truncation": r.truncation.get("mode", "disabled"),
        "error": None,
        "incomplete_details": None,
        "output": [],
        "usage": None,
    }


def extractive_summary(text: str, max_chars: int) -> str:
    """The reasoning's first and last sentences, at most `max_chars` (not a model-written summary)."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    sentences = [s.strip() for s in text.replace("? ", "?\n").replace(". ", ".\n").split("\n") if s.strip()]
    first, last = sentences[0], sentences[-1]
    half = max(1, (max_chars - 3) // 2)
    if len(first) + len(last) + 3 > max_chars or first == last:
        return text[:half] + " … " + text[-half:]
    return f"{first} … {last}"


# -- events -----------------------------------------------------------------------------------------


class EventWriter:
    """Produces a session's numbered stream events from its text so far.

    Its state (what has been sent) is rebuilt from the stored events after a takeover, so a resumed
    session continues the numbering and the text exactly where the log ends.
    """

    def __init__(self, response_id: str, has_reasoning: bool, summary: str | None) -> None:
        self.response_id = response_id
        self.has_reasoning = has_reasoning
        self.summary = summary
        self.seq = 0
        self.started = False
        self.reasoning_open = False
        self.reasoning_done = False
        self.message_open = False
        self.reasoning_sent = ""
        self.answer_sent = ""
        self.finished = False
        self.rs_id = "rs_" + response_id.removeprefix("resp_")
        self.msg_id = "msg_" + response_id.removeprefix("resp_")

    @classmethod
    def from_events(
        cls, response_id: str, has_reasoning: bool, summary: str | None, events: list[Event]
    ) -> EventWriter:
        w = cls(response_id, has_reasoning, summary)
        for ev in events:
            w.seq = ev.seq + 1
            t = ev.type
            if t == "response.created":
                w.started = True
            elif t == "response.output_item.added":
                if ev.data["item"]["type"] == "reasoning":
                    w.reasoning_open = True
                else:
                    w.message_open = True
            elif t == "response.output_item.done" and ev.data["item"]["type"] == "reasoning":
                w.reasoning_done = True
            elif t == "response.reasoning_text.delta":
                w.reasoning_sent += ev.data["delta"]
            elif t == "response.output_text.delta":
                w.answer_sent += ev.data["delta"]
            elif t in TERMINAL_EVENTS:
                w.finished = True
        return w

    def _ev(self, type_: str, **data: Any) -> Event:
        ev = Event(self.seq, type_, {"type": type_, "sequence_number": self.seq, **data})
        self.seq += 1
        return ev

    @property
    def full(self) -> bool:
        return self.summary == SummaryMode.FULL

    def start(self, obj: dict[str, Any]) -> list[Event]:
        """`response.created` and `response.in_progress` (once per session)."""
        if self.started:
            return []
        self.started = True
        return [
            self._ev("response.created", response=obj),
            self._ev("response.in_progress", response=dict(obj, status="in_progress")),
        ]

    def reasoning_item(self, text: str, done: bool) -> dict[str, Any]:
        item: dict[str, Any] = {"type": "reasoning", "id": self.rs_id, "summary": []}
        if done and self.summary in SUMMARY_MODES and text:
            item["summary"] = [
                {"type": "summary_text", "text": extractive_summary(text, _SUMMARY_CHARS[self.summary])}
            ]
        if self.full:
            item["content"] = [{"type": "reasoning_text", "text": text}] if done else []
        if done:
            item["status"] = "completed"
        return item

    def message_item(self, text: str, done: bool) -> dict[str, Any]:
        return {
            "type": "message",
            "id": self.msg_id,
            "status": "completed" if done else "in_progress",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}] if done else [],
        }

    def _open_reasoning(self) -> list[Event]:
        if self.reasoning_open or not self.has_reasoning:
            return []
        self.reasoning_open = True
        return [self._ev("response.output_item.added", output_index=0, item=self.reasoning_item("", False))]

    def _close_reasoning(self, reasoning: str) -> list[Event]:
        if not self.reasoning_open or self.reasoning_done:
            return []
        self.reasoning_done = True
        out = []
        if self.summary in SUMMARY_MODES and reasoning:
            summary = self.reasoning_item(reasoning, True)["summary"][0]["text"]
            common = {"item_id": self.rs_id, "output_index": 0, "summary_index": 0}
            out.append(self._ev("response.reasoning_summary_text.delta", delta=summary, **common))
            out.append(self._ev("response.reasoning_summary_text.done", text=summary, **common))
        if self.full:
            out.append(
                self._ev(
                    "response.reasoning_text.done",
                    item_id=self.rs_id,
                    output_index=0,
                    content_index=0,
                    text=reasoning,
                )
            )
        out.append(
            self._ev("response.output_item.done", output_index=0, item=self.reasoning_item(reasoning, True))
        )
        return out

    @property
    def _msg_index(self) -> int:
        return 1 if self.has_reasoning and self.reasoning_open else 0

    def progress(self, reasoning: str, answer: str, in_answer: bool, final: bool) -> list[Event]:
        """Events for the text that is new since the last call. `reasoning`/`answer`: the whole texts
        so far; `in_answer`: the reasoning block is over (or never opened). Unless `final`, a trailing
        replacement character (a multi-byte character cut between tokens) is held back."""
        if not final:
            reasoning, answer = reasoning.rstrip("\ufffd"), answer.rstrip("\ufffd")
        out: list[Event] = []
        if not in_answer or reasoning:
            out += self._open_reasoning()
        if self.full and self.reasoning_open and not self.reasoning_done:
            new = reasoning[len(self.reasoning_sent) :]
            if new:
                self.reasoning_sent += new
                out.append(
                    self._ev(
                        "response.reasoning_text.delta",
                        item_id=self.rs_id,
                        output_index=0,
                        content_index=0,
                        delta=new,
                    )
                )
        if not in_answer:
            return out
        out += self._close_reasoning(reasoning)
        idx = self._msg_index
        if not self.message_open:
            self.message_open = True
            out.append(
                self._ev("response.output_item.added", output_index=idx, item=self.message_item("", False))
            )
            out.append(
                self._ev(
                    "response.content_part.added",
                    item_id=self.msg_id,
                    output_index=idx,
                    content_index=0,
                    part={"type": "output_text", "text": "", "annotations": []},
                )
            )
        new = answer[len(self.answer_sent) :]
        if new:
            self.answer_sent += new
            out.append(
                self._ev(
                    "response.output_text.delta",
                    item_id=self.msg_id,
                    output_index=idx,
                    content_index=0,
                    delta=new,
                )
            )
        return out

    def close(self, reasoning: str, answer: str, in_answer: bool, cancelled: bool) -> list[Event]:
        """The events that end the output: the last text (unless `cancelled`: what was sent stays
        the answer), then the open items closed. No item is opened that has no text to carry."""
        out = [] if cancelled else self.progress(reasoning, answer, in_answer, final=True)
        out += self._close_reasoning(reasoning)
        if self.message_open:
            idx, text = self._msg_index, self.answer_sent
            common = {"item_id": self.msg_id, "output_index": idx, "content_index": 0}
            out.append(self._ev("response.output_text.done", text=text, **common))
            out.append(
                self._ev(
                    "response.content_part.done",
                    part={"type": "output_text", "text": text, "annotations": []},
                    **common,
                )
            )
            out.append(
                self._ev("response.output_item.done", output_index=idx, item=self.message_item(text, True))
            )
        return out

    def output(self, reasoning: str) -> list[dict[str, Any]]:
        """The response's `output` items, as the events gave them (call after `close`)."""
        items: list[dict[str, Any]] = []
        if self.reasoning_open:
            items.append(self.reasoning_item(reasoning, True))
        if self.message_open:
            items.append(self.message_item(self.answer_sent, True))
        return items

    def terminal(self, obj: dict[str, Any]) -> Event:
        """`response.<status>` with the final object: the session's last event."""
        self.finished = True
        return self._ev(f"response.{obj['status']}", response=obj)
