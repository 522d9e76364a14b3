"""Prompts from prefix-block ids: equal leading ids give equal leading tokens (a real prefix-cache hit).

The Mooncake trace gives each request its prefix blocks as ids (equal leading ids = a shared prefix);
to replay it against a real engine the ids must become text whose tokens are equal exactly where the
ids are. `PromptBuilder` writes block `h` as `block_tokens` words drawn by a RNG seeded with `h`, from
the words that the model's tokenizer keeps as one token with their leading space. With a byte-level
BPE that splits before each space-prefixed word (GPT-2's pre-tokenizer; the tiny local models use
it), no token crosses a word boundary, so block `h` is the same `block_tokens` tokens in every prompt
and a prompt of `n` tokens is exactly `n` tokens (`check` verifies that on the real tokenizer).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

#: Fewest one-token words a tokenizer must have for blocks to be varied enough.
MIN_WORDS = 64


class PromptBuilder:
    """Deterministic prompt text for block ids.

    Args:
        tokenizer: a `transformers` tokenizer (`get_vocab`, `encode`, `decode`).
        block_tokens: tokens per block (the trace's 512 x its token scale).
    """

    def __init__(self, tokenizer: Any, block_tokens: int) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, not {block_tokens}")
        self._tok = tokenizer
        self.block_tokens = block_tokens
        words = []
        for token_id in sorted(tokenizer.get_vocab().values()):
            text = tokenizer.decode([token_id])
            if len(text) > 2 and text[0] == " " and text[1:].isalpha() and text[1:].isascii():
                if tokenizer.encode(text, add_special_tokens=False) == [token_id]:
                    words.append(text)
        if len(words) < MIN_WORDS:
            raise ValueError(
                f"the tokenizer has {len(words)} one-token words with a leading space; "
                f"a prompt builder needs at least {MIN_WORDS} (is it a byte-level BPE?)"
            )
        self.words = words

    def resized(self, block_tokens: int) -> PromptBuilder:
        """The same words with another block size (the vocabulary is scanned once)."""
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, not {block_tokens}")
        other = object.__new__(PromptBuilder)
        other._tok, other.block_tokens, other.words = self._tok, block_tokens, self.words
        return other

    def block(self, block_id: int, tokens: int | None = None) -> str:
        """The text of block `block_id` (its first `tokens` tokens; default: the whole block)."""
        rng = random.Random(block_id)
        n = self.block_tokens if tokens is None else tokens
        return "".join(rng.choice(self.words) for _ in range(n))

    def prompt(self, block_ids: Sequence[int], tokens: int) -> str:
        """`tokens` tokens: whole blocks for `block_ids` in order, the last one cut short; past the ids,
        filler from a block id no trace uses (negative)."""
        out, left = [], tokens
        for block_id in block_ids:
            if left <= 0:
                break
            n = min(left, self.block_tokens)
            out.append(self.block(block_id, n))
            left -= n
        if left > 0:
            out.append(self.block(-1 - len(block_ids), left))
        return "".join(out)

    def check(self, text: str, tokens: int) -> None:
        """Raise unless `text` is exactly `tokens` tokens for this tokenizer."""
        n = len(self._tok.encode(text, add_special_tokens=False))
        if n != tokens:
            raise ValueError(f"prompt is {n} tokens, not {tokens}: this tokenizer merges across words")
