"""Tests for serving.local_model: the offline builder of tiny Llama models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.local_model import (
    BUILD_MARKER,
    LOCAL_MODELS,
    REQUIRED_FILES,
    build_local_models,
    is_built,
    model_path,
)

INTENT = "tiny-intent"
REASONING = "tiny-reasoning"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache with both local models built once for the whole module."""
    cache = tmp_path_factory.mktemp("models")
    build_local_models(cache)
    return cache


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_specs_use_head_dim_64() -> None:
    assert {spec.name for spec in LOCAL_MODELS} == {INTENT, REASONING}
    for spec in LOCAL_MODELS:
        assert spec.hidden_size == 64 * spec.num_heads
        assert spec.num_heads % spec.num_kv_heads == 0
        assert spec.max_position_embeddings == 4096


def test_build_writes_all_files(cache_dir: Path) -> None:
    for spec in LOCAL_MODELS:
        path = model_path(cache_dir, spec.name)
        assert path == cache_dir / spec.name
        for filename in (*REQUIRED_FILES, BUILD_MARKER):
            assert (path / filename).is_file(), filename
        assert is_built(cache_dir, spec.name)
    # Staging directories are gone once the builds are in place.
    assert sorted(p.name for p in cache_dir.iterdir()) == [INTENT, REASONING]


def test_second_call_skips_existing_build(cache_dir: Path) -> None:
    files = sorted(model_path(cache_dir, INTENT).iterdir())
    before = {f.name: f.stat().st_mtime_ns for f in files}

    paths = build_local_models(cache_dir, [INTENT])

    assert paths == {INTENT: cache_dir / INTENT}
    after = {f.name: f.stat().st_mtime_ns for f in sorted(paths[INTENT].iterdir())}
    assert after == before


def test_force_rebuild_is_byte_identical(tmp_path: Path) -> None:
    path = build_local_models(tmp_path, [INTENT])[INTENT]
    before = {name: (path / name).read_bytes() for name in ("model.safetensors", "tokenizer.json")}
    marker_mtime = (path / BUILD_MARKER).stat().st_mtime_ns

    build_local_models(tmp_path, [INTENT], force=True)

    assert (path / BUILD_MARKER).stat().st_mtime_ns != marker_mtime
    for name, content in before.items():
        assert (path / name).read_bytes() == content, name


def test_incomplete_build_is_rebuilt(tmp_path: Path) -> None:
    path = build_local_models(tmp_path, [INTENT])[INTENT]
    (path / BUILD_MARKER).unlink()
    assert not is_built(tmp_path, INTENT)

    build_local_models(tmp_path, [INTENT])

    assert is_built(tmp_path, INTENT)


def test_stale_marker_is_not_built(tmp_path: Path) -> None:
    path = build_local_models(tmp_path, [INTENT])[INTENT]
    marker = json.loads((path / BUILD_MARKER).read_text())
    marker["format_version"] = -1
    (path / BUILD_MARKER).write_text(json.dumps(marker))

    assert not is_built(tmp_path, INTENT)


def test_unknown_model_name_raises(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="no-such-model"):
        build_local_models(tmp_path, ["no-such-model"])


@pytest.mark.parametrize("name", [INTENT, REASONING])
def test_tokenizer_roundtrips_unicode(cache_dir: Path, name: str) -> None:
    tokenizer = _load_tokenizer(cache_dir / name)
    text = "Héllo wörld! 日本語 한국어 русский العربية 😀🚀 \t tabs\n\nand  spaces ∑π € \x00 end"

    ids = tokenizer(text)["input_ids"]

    assert ids[0] == tokenizer.bos_token_id
    assert max(ids) < len(tokenizer)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("name", [INTENT, REASONING])
def test_tokenizer_special_tokens(cache_dir: Path, name: str) -> None:
    tokenizer = _load_tokenizer(cache_dir / name)
    generation = json.loads((cache_dir / name / "generation_config.json").read_text())

    assert tokenizer.bos_token == "<|begin_of_text|>"
    assert tokenizer.eos_token == "<|end_of_text|>"
    assert tokenizer.pad_token == "<|pad|>"
    for token in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<think>", "</think>"):
        assert tokenizer.tokenize(token) == [token]
    assert generation["eos_token_id"] == [
        tokenizer.convert_tokens_to_ids("<|eot_id|>"),
        tokenizer.eos_token_id,
    ]


@pytest.mark.parametrize(("name", "opens_think"), [(INTENT, False), (REASONING, True)])
def test_chat_template(cache_dir: Path, name: str, opens_think: bool) -> None:
    tokenizer = _load_tokenizer(cache_dir / name)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Book a flight."}]},
    ]

    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if not isinstance(ids, list):  # Newer transformers return a BatchEncoding.
        ids = ids["input_ids"]

    assert text.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBook a flight.<|eot_id|>"
    )
    prompt_end = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert text.endswith(prompt_end + "<think>\n" if opens_think else prompt_end)
    assert ids.count(tokenizer.bos_token_id) == 1
    assert (tokenizer.convert_tokens_to_ids("<think>") in ids) is opens_think


@pytest.mark.parametrize("spec", LOCAL_MODELS, ids=lambda spec: spec.name)
def test_config_is_llama_with_head_dim_64(cache_dir: Path, spec) -> None:
    config = json.loads((cache_dir / spec.name / "config.json").read_text())
    tokenizer = _load_tokenizer(cache_dir / spec.name)

    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["head_dim"] == 64
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    assert config["vocab_size"] == spec.vocab_size >= len(tokenizer)
    assert config["max_position_embeddings"] == 4096
    assert config["tie_word_embeddings"] is False
    assert config["bos_token_id"] == tokenizer.bos_token_id
    assert config["eos_token_id"] == tokenizer.eos_token_id


def test_model_runs_in_transformers(cache_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    path = cache_dir / INTENT
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = _load_tokenizer(path)("book a flight", return_tensors="pt")["input_ids"]

    with torch.no_grad():
        logits = model(input_ids=ids).logits

    assert model.dtype == torch.float32
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
