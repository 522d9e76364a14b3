"""OpenAI API request bodies (pydantic, validated at the edge) and response builders.

Unknown request fields are ignored, as OpenAI-compatible servers do, except ones whose silent
dropping would change the answer (those are rejected with a 400 naming the field).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serving.config import _NAME_RE
from serving.replicas.engines.base import SamplingOptions
from serving.sessions.events import SummaryMode

_MAX_STOP = 4
#: Longest stop sequence (characters): the engine looks for every stop sequence after each token, so a
#: long one costs every step; real ones are a few words.
MAX_STOP_CHARS = 1024
#: Most items in `messages`, `input` and a message's content parts (OpenAI's own limit on `messages`).
#: A long context is a few long messages; the prompt's size is bounded by characters in the pipeline.
MAX_ITEMS = 2048
#: Most stop token ids.
MAX_STOP_TOKEN_IDS = 64
#: Bound of every token count and token id in a request: no context holds more, and engines keep them
#: in 32-bit integers (a larger value would overflow there, not be a clean 400).
MAX_INT32 = 2**31 - 1
#: Longest model name, response id or the like (characters).
MAX_NAME_CHARS = 256
#: Deepest JSON nesting of a request body; real requests nest about 5 levels.
MAX_JSON_DEPTH = 64

_TokenCount = Annotated[int, Field(ge=1, le=MAX_INT32)]
_TokenId = Annotated[int, Field(ge=0, le=MAX_INT32)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    """`stream_options` of a streaming request."""

    include_usage: bool = Field(False, description="Send a last chunk with token usage.")


class TextPart(_Body):
    """A text content part."""

    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    """One chat message."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[TextPart], Field(max_length=MAX_ITEMS)] | None = None
    name: str | None = Field(None, max_length=MAX_NAME_CHARS)

    def text(self) -> str:
        """The message's text (content parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class _SamplingBody(_Body):
    """Sampling fields shared by chat and text completions."""

    model: str = Field(
        min_length=1, max_length=MAX_NAME_CHARS, description="Served model name (see /v1/models)."
    )
    max_tokens: _TokenCount | None = Field(
        None, description="Most tokens to generate; defaults to the rest of the context."
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(
        None, ge=-1, le=MAX_INT32, description="vLLM extension; -1 or None disables it."
    )
    min_tokens: int = Field(0, ge=0, le=MAX_INT32, description="vLLM extension.")
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    stop_token_ids: list[_TokenId] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = Field(False, description="vLLM extension: keep going past EOS.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    n: int = Field(1, ge=1, le=1, description="Only n=1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logprobs: Any = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > _MAX_STOP:
            raise ValueError(f"at most {_MAX_STOP} stop sequences")
        if isinstance(v, list) and any(s == "" for s in v) or v == "":
            raise ValueError("stop sequences must be non-empty")
        if any(len(s) > MAX_STOP_CHARS for s in ([v] if isinstance(v, str) else v or [])):
            raise ValueError(f"a stop sequence has at most {MAX_STOP_CHARS} characters")
        return v

    @model_validator(mode="after")
    def _unsupported(self) -> _SamplingBody:
        if self.logprobs not in (None, False):
            raise ValueError("logprobs: not supported by this server yet; omit it")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    def requested_max_tokens(self) -> int | None:
        """The client's cap on generated tokens, if any."""
        return self.max_tokens

    def sampling(self, max_tokens: int) -> SamplingOptions:
        """Engine-neutral sampling options."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=None if self.top_k in (None, -1, 0) else self.top_k,
            min_tokens=min(self.min_tokens, max_tokens),
            seed=self.seed,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )


class ChatCompletionRequest(_SamplingBody):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_ITEMS)
    max_completion_tokens: _TokenCount | None = None
    tools: list[dict[str, Any]] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = Field(
        None, description="Used to pick a tier for `model: auto` (routing.rules)."
    )
    max_reasoning_tokens: _TokenCount | None = Field(
        None,
        description="Reasoning budget (reasoning models): at this many reasoning tokens the "
        "closing tag is forced and the answer follows. Counts within max_tokens.",
    )
    include_reasoning: bool = Field(
        False,
        description="Reasoning models: return the reasoning text in `reasoning_content` (hidden by "
        "default; `content` is the answer only).",
    )

    @model_validator(mode="after")
    def _chat_unsupported(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools: tool calling is not supported by this server yet; omit it")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingBody):
    """POST /v1/completions (one prompt: a string or a list of token ids)."""

    prompt: str | list[_TokenId] = Field(
        description="A string, or token ids (a batch of prompts is not supported)."
    )
    echo: bool = Field(False, description="Must be false.")
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_unsupported(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo: not supported; set it to false")
        if self.suffix:
            raise ValueError("suffix: not supported; omit it")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: must not be empty")
        return self


_EFFORTS = Literal["none", "minimal", "low", "medium", "high"]


class ReasoningParams(_Body):
    """`reasoning` of a Responses request."""

    effort: _EFFORTS | None = Field(None, description="Used to pick a tier for `model: auto`.")
    max_tokens: _TokenCount | None = Field(
        None, description="Reasoning budget: the closing tag is forced at this many reasoning tokens."
    )
    summary: SummaryMode | None = Field(
        None,
        description="Reasoning is hidden by default. auto/concise/detailed: an extractive summary "
        "(first and last sentences); full: the whole reasoning text.",
    )


class InputText(_Body):
    """A text content part of a Responses input message."""

    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(_Body):
    """One input message of a Responses request."""

    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[InputText], Field(max_length=MAX_ITEMS)]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponsesRequest(_Body):
    """POST /v1/responses (a subset of the OpenAI Responses API)."""

    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS, description="Served model name or `auto`.")
    input: str | Annotated[list[InputMessage], Field(max_length=MAX_ITEMS)] = Field(
        description="A user message, or a list of messages."
    )
    instructions: str | None = Field(None, description="A system message put before the input.")
    max_output_tokens: _TokenCount | None = Field(
        None, description="Most tokens generated in all (reasoning included)."
    )
    reasoning: ReasoningParams | None = None
    background: bool = Field(False, description="Run detached from this request; poll or stream it later.")
    stream: bool = False
    store: bool = Field(True, description="Must be true: every response is stored (sessions).")
    previous_response_id: str | None = Field(
        None, max_length=MAX_NAME_CHARS, description="Continue that response's conversation."
    )
    metadata: dict[str, str] | None = Field(None, description="Up to 16 string pairs echoed back.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    truncation: Literal["auto", "disabled"] = Field(
        "disabled",
        description="auto: when the conversation does not fit the context, drop its oldest turns (never "
        "the instructions or the last turn); disabled: answer 400.",
    )

    @field_validator("input")
    @classmethod
    def _input_not_empty(cls, v: str | list[InputMessage]) -> str | list[InputMessage]:
        if isinstance(v, list) and not v:
            raise ValueError("must not be empty")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata_bounds(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None and (
            len(v) > 16 or any(len(k) > 64 for k in v) or any(len(x) > 512 for x in v.values())
        ):
            raise ValueError("at most 16 keys of 64 characters, values of 512 characters")
        return v

    @field_validator("store")
    @classmethod
    def _stored(cls, v: bool) -> bool:
        if not v:
            raise ValueError("responses are always stored here; omit it or set it to true")
        return v

    def sampling(self, max_tokens: int) -> SamplingOptions:
        return SamplingOptions(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed
        )


def error_body(message: str, type_: str, param: str | None = None, code: Any = None) -> dict:
    """The OpenAI error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt: int, completion: int, cached: int, reasoning: int | None = None) -> dict:
    """OpenAI usage block with cached prompt tokens (and reasoning tokens, for reasoning models)."""
    out = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    if reasoning is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return out


def now() -> int:
    """Unix seconds for `created`."""
    return int(time.time())


class ApiError(Exception):
    """An error answered in the OpenAI shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}


#: Request header: the tenant, honoured only when auth is disabled (local use, tests).
TENANT_HEADER = "x-tandem-tenant"
#: Request header: the tier of a `model: auto` request (intent, reasoning, ...).
TASK_HEADER = "x-tandem-task"
#: Request header: the agent task a call belongs to (its fan-out semaphore).
TASK_ID_HEADER = "x-tandem-task-id"
#: Request header: priority class (interactive | standard | batch), at most the tenant's.
PRIORITY_HEADER = "x-tandem-priority"
#: Request header: a conversation's session id (session affinity in the router).
SESSION_HEADER = "x-session-id"
#: Request header: prefill/decode disaggregation for this request (on | off | auto).
DISAGG_HEADER = "x-tandem-disagg"
#: Response header: how the request was served (tier, task type, template, mode, replicas).
ROUTE_HEADER = "x-tandem-route"
#: Request header (chat completions): `auto` drops the oldest turns when the conversation does not fit
#: the context (what `truncation: "auto"` does on /v1/responses); `disabled` (the default) answers 400.
TRUNCATION_HEADER = "x-tandem-truncation"
#: Request header: `clamp` lowers max_tokens to what fits the context; `strict` (the default) answers 400.
MAX_TOKENS_HEADER = "x-tandem-max-tokens"
#: Response header: what context-overflow handling did (turns dropped and their tokens, max_tokens clamped).
TRUNCATED_HEADER = "x-tandem-truncated"


def _choice_header(headers: Any, name: str, on: str, off: str) -> bool:
    """Whether the request's `name` header says `on` (absent or `off`: False); 400 naming it otherwise."""
    value = headers.get(name) if headers is not None else None
    if value is None or not value.strip():
        return False
    value = value.strip().lower()
    if value not in (on, off):
        msg = f"header {name}: {value!r} is not one of {on}, {off}"
        raise ApiError(400, msg, "invalid_request_error", name)
    return value == on


def truncation_header(headers: Any) -> bool:
    """`x-tandem-truncation: auto` (drop the oldest turns to fit) or `disabled` (the default)."""
    return _choice_header(headers, TRUNCATION_HEADER, "auto", "disabled")


def max_tokens_clamp(headers: Any) -> bool:
    """`x-tandem-max-tokens: clamp` (lower max_tokens to what fits) or `strict` (the default)."""
    return _choice_header(headers, MAX_TOKENS_HEADER, "clamp", "strict")


# -- the edge: request headers and the parsed JSON body -------------------------------------------

#: Longest value of a Tandem request header (characters).
MAX_HEADER_CHARS = 256
#: Request headers whose values Tandem reads: identifiers and choices, printable ASCII only.
CHECKED_HEADERS = (
    TASK_HEADER,
    TASK_ID_HEADER,
    SESSION_HEADER,
    PRIORITY_HEADER,
    DISAGG_HEADER,
    TRUNCATION_HEADER,
    MAX_TOKENS_HEADER,
)
_HEADER_VALUE = re.compile(rf"[\x20-\x7e]{{0,{MAX_HEADER_CHARS}}}")
_TENANT_NAME = re.compile(_NAME_RE)


def check_headers(headers: Mapping[str, str], tenant_header: bool) -> None:
    """400 naming the header when a Tandem request header holds a control character (CR, LF, NUL),
    non-ASCII text or more than MAX_HEADER_CHARS characters; `tenant_header`: x-tandem-tenant is
    honoured (auth disabled) and must be a tenant name."""
    for name in CHECKED_HEADERS:
        value = headers.get(name)
        if value is not None and not _HEADER_VALUE.fullmatch(value):
            msg = f"header {name}: must be at most {MAX_HEADER_CHARS} printable ASCII characters"
            raise ApiError(400, msg, "invalid_request_error", name, "invalid_header")
    value = headers.get(TENANT_HEADER) if tenant_header else None
    if value is not None and value.strip() and not _TENANT_NAME.fullmatch(value.strip()):
        msg = (
            f"header {TENANT_HEADER}: must be a tenant name (lowercase letters, digits, '.', '_', '-'; "
            "at most 63 characters)"
        )
        raise ApiError(400, msg, "invalid_request_error", TENANT_HEADER, "invalid_header")


#: Bytes without which no lone surrogate can parse from a JSON body: the start of a `\\uD800`-`\\uDFFF`
#: escape, or the lead byte of a surrogate's UTF-8 form (Python's json takes it from bytes). They also
#: start other characters (Hangul, `\\ud7ff`): then the strings are looked at.
_SURROGATE_HINTS = (b"\\ud", b"\\uD", b"\xed")


def _surrogate_at(text: str) -> int | None:
    """Where `text` holds a lone UTF-16 surrogate (JSON `"\\ud800"` parses to one), or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def body_problem(
    body: Any, raw: bytes | None = None, max_depth: int = MAX_JSON_DEPTH
) -> tuple[str | None, str] | None:
    """The first problem of a parsed JSON body as (field, message), None if there is none: a string
    (value or key) with a lone surrogate, which no UTF-8 encoder (the response, the store, the
    tokenizer) can take, or nesting deeper than `max_depth`.

    Iterative, so any depth is safe to walk; `raw` (the body's bytes) lets it skip what cannot be
    there: strings when no surrogate can have parsed, everything when there are fewer brackets than
    `max_depth` too (a prompt of token ids is not walked).
    """
    strings = raw is None or any(hint in raw for hint in _SURROGATE_HINTS)
    if not strings and raw is not None and raw.count(b"[") + raw.count(b"{") < max_depth:
        return None
    # Paths are kept as parent links and spelled out only for the answer.
    links: list[tuple[Any, int]] = [(None, -1)]

    def field(node: int) -> str | None:
        parts = []
        while node > 0:
            key, node = links[node]
            parts.append(str(key)[:64])
        return ".".join(reversed(parts)) or None

    surrogate = (
        "contains a lone UTF-16 surrogate (U+{:04X}) at character {}; send valid Unicode (an escaped "
        "character outside the BMP needs both halves of its pair)"
    )
    kinds = (dict, list, str) if strings else (dict, list)
    stack: list[tuple[Any, int, int]] = [(body, 0, 0)]
    while stack:
        value, node, depth = stack.pop()
        if isinstance(value, str):
            at = _surrogate_at(value)
            if at is not None:
                return field(node), surrogate.format(ord(value[at]), at)
            continue
        if not isinstance(value, dict | list):
            continue
        if depth >= max_depth:
            return field(node), f"nested more than {max_depth} levels deep"
        if isinstance(value, dict):
            if strings:
                for key in value:
                    if _surrogate_at(key) is not None:
                        return field(node), "a key contains a lone UTF-16 surrogate; send valid Unicode"
            items: Any = value.items()
        else:
            items = enumerate(value)
        children = [(k, v) for k, v in items if isinstance(v, kinds)]
        for k, v in reversed(children):
            links.append((k, node))
            stack.append((v, len(links) - 1, depth + 1))
    return None
