"""Tokenization at the ingress: chat template applied once, token ids handed to the engine."""

from __future__ import annotations

from typing import Any

from serving.http.protocol import ChatMessage


class TextStream:
    """Text of ids fed a few at a time, exactly as decoding them all at once would give it: a
    multi-byte character cut between tokens is held back until it is complete (the `tokenizers`
    library's DecodeStream, as vLLM's detokenizer uses)."""

    def __init__(self, tokenizer: Any) -> None:
        from tokenizers.decoders import DecodeStream

        self._tok = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def feed(self, ids: list[int]) -> str:
        """The text the new `ids` complete."""
        parts = [self._stream.step(self._tok, i) for i in ids]
        return "".join(p for p in parts if p)


class PromptTokenizer:
    """The model's own tokenizer and chat template (Hugging Face format, loaded from `path`).

    Methods are synchronous and CPU-bound: call them through `asyncio.to_thread`.
    """

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self._tok: Any = AutoTokenizer.from_pretrained(path)
        if not getattr(self._tok, "chat_template", None):
            raise ValueError(f"tokenizer at {path} has no chat template; chat completions need one")

    def encode_chat(self, messages: list[ChatMessage]) -> list[int]:
        """Render `messages` with the chat template (generation prompt added) and tokenize."""
        conversation = [{"role": m.role, "content": m.text()} for m in messages]
        text = self._tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        # The template already carries the special tokens (BOS, headers).
        return self._tok.encode(text, add_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        """Tokenize a raw completion prompt (with BOS, as the model expects)."""
        return self._tok.encode(text, add_special_tokens=True)

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids (special tokens, such as reasoning tags, left out)."""
        return self._tok.decode(ids, skip_special_tokens=True)

    def decode_prompt(self, ids: list[int]) -> str:
        """The text of prompt ids with every special token kept: what an external server that takes no
        token ids is sent (its tokenizer reads the chat template's markers back as the same tokens).
        A leading BOS is left out: the server's tokenizer adds its own (measured on vLLM: kept, it
        became two)."""
        bos = self._tok.bos_token_id
        if ids and bos is not None and ids[0] == bos:
            ids = ids[1:]
        return self._tok.decode(ids, skip_special_tokens=False)

    def encode_text(self, text: str) -> list[int]:
        """Ids of a piece of generated text (no special tokens added): an external server's streamed
        text, when it sends no token ids."""
        return self._tok.encode(text, add_special_tokens=False)

    def decode_stream(self) -> TextStream:
        """An incremental decoder of generated ids (special tokens left out)."""
        return TextStream(self._tok._tokenizer)

    def token_id(self, token: str) -> int:
        """The id of `token`, which must be a single token of the vocabulary (ValueError otherwise)."""
        ids = self._tok.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{token!r} is not a single token of this tokenizer (it encodes to {ids})")
        return ids[0]

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows."""
        return len(self._tok)

    def fingerprint(self) -> str:
        """A digest of the vocabulary (token -> id, special tokens included): two models with the same
        fingerprint read each other's token ids alike, so a stream may continue from one on the other
        (serving.http.migration)."""
        import hashlib
        import json

        vocab = sorted(self._tok.get_vocab().items())
        return hashlib.sha256(json.dumps(vocab, ensure_ascii=True).encode()).hexdigest()[:16]
