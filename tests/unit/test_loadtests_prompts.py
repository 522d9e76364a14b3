"""loadtests.prompts with the tiny models' real tokenizer: block ids to text, token for token."""

from __future__ import annotations

import os

import pytest

from loadtests.prompts import PromptBuilder


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from serving.config import default_model_dir

    path = os.path.join(os.path.expanduser(default_model_dir()), "tiny-intent")
    assert os.path.isdir(path), f"tiny-intent is not built at {path}: run `make models` first"
    return AutoTokenizer.from_pretrained(path)


def test_equal_leading_ids_give_equal_leading_tokens(tokenizer) -> None:
    b = PromptBuilder(tokenizer, block_tokens=64)
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    a = enc(b.prompt([0, 1, 2, 3], 230))
    c = enc(b.prompt([0, 1, 9, 4], 250))
    assert len(a) == 230 and len(c) == 250  # exact lengths, the last block cut short
    assert a[:128] == c[:128]  # the two shared blocks
    assert a[128:192] != c[128:192]  # the third block differs
    # Past the ids: filler, still exact.
    assert len(enc(b.prompt([5], 300))) == 300
    assert enc(b.prompt([7], 64)) == enc(b.block(7))
    b.check(b.prompt([0, 1], 100), 100)
    with pytest.raises(ValueError, match="not 99"):
        b.check(b.prompt([0, 1], 100), 99)


def test_builder_refuses_a_tokenizer_without_words() -> None:
    class Chars:
        def get_vocab(self) -> dict[str, int]:
            return {chr(97 + i): i for i in range(26)}

        def decode(self, ids: list[int]) -> str:
            return "".join(chr(97 + i) for i in ids)

        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [ord(ch) - 97 for ch in text]

    with pytest.raises(ValueError, match="one-token words"):
        PromptBuilder(Chars(), 16)
