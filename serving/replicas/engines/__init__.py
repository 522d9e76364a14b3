"""Inference engines behind the `Engine` protocol (vLLM, SGLang, and a fake for unit tests)."""

from __future__ import annotations

from typing import Any

from serving.config import EngineKind, Role
from serving.replicas.engines.base import Engine


def make_engine(
    kind: EngineKind,
    model_name: str,
    model_path: str,
    engine_args: dict[str, Any],
    role: Role = Role.COLOCATED,
) -> Engine:
    """Construct (not start) the engine of `kind` for a pool with `role`. Imported lazily."""
    if kind is EngineKind.VLLM:
        from serving.replicas.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model_name, model_path, engine_args)
    if kind is EngineKind.FAKE:
        from serving.replicas.engines.fake import FakeEngine

        return FakeEngine(model_name, **engine_args)
    if kind is EngineKind.SGLANG:
        from serving.replicas.engines.sglang_engine import SGLangEngine

        return SGLangEngine(model_name, model_path, engine_args, role=role.value)
    raise ValueError(f"engine: unknown engine {kind!r}")
