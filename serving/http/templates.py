"""The prompt template library an ingress replica uses, and its hot reload from a mounted file.

The spec's `templates.library` is the library at start. With `templates.library_file` (a mounted
ConfigMap on Kubernetes) the file's library replaces it and the file is checked every
`reload_interval_s`: a changed file that validates (the same pydantic models as the spec, its
bindings checked against the spec's tiers and task types) replaces the library for the next request;
one that does not keeps the library in use, and the reason is logged, counted
(`tandem_template_reloads_total{result="invalid"}`) and kept in `last_error`. Nothing restarts.

Selection and composition are pure (router.templates); this module only reads, validates and swaps.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from router.templates import Binding, Inject, Library, Template
from serving.config import TemplateLibrarySpec, TemplatesSpec, validation_errors

logger = logging.getLogger(__name__)


class LibraryError(ValueError):
    """A library file that cannot be used; the message says what to fix."""


def to_library(spec: TemplateLibrarySpec) -> Library:
    """The router's form of a validated library (router.templates.Library)."""
    by_name: dict[str, dict[int, Template]] = {}
    for t in spec.templates:
        sampling = tuple(sorted((k, v) for k, v in t.sampling.model_dump().items() if v is not None))
        by_name.setdefault(t.name, {})[t.version] = Template(
            t.name,
            t.version,
            t.system,
            tuple((turn.role, turn.content) for turn in t.few_shot),
            tuple(t.stop),
            sampling,
            Inject(t.inject.value),
        )
    bindings = tuple(Binding(b.template, b.tier, b.task, b.tenant) for b in spec.bindings)
    digest = hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    return Library(by_name, bindings, digest[:12])


def parse_library(text: str, origin: str, tiers: list[str], tasks: list[str]) -> TemplateLibrarySpec:
    """Validate a library file's text (YAML or JSON); LibraryError naming the field otherwise."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise LibraryError(f"{origin}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise LibraryError(f"{origin}: a template library is a mapping with `templates` and `bindings`")
    try:
        spec = TemplateLibrarySpec.model_validate(data)
    except ValidationError as err:
        problems = validation_errors(err, "<library>")
        raise LibraryError(f"invalid template library {origin}:\n{problems}") from None
    try:
        spec.check_scopes(tiers, tasks)
    except ValueError as e:
        raise LibraryError(f"invalid template library {origin}:\n  {e}") from None
    return spec


class TemplateLibrary:
    """The library in use, reloaded from `spec.library_file` when it changes.

    Args:
        spec: the deployment spec's `templates`.
        tiers / tasks: the spec's tier and task type names (a binding must name one of them).
        metrics: where reloads are counted (IngressMetrics; None in pure unit use).
    """

    def __init__(
        self, spec: TemplatesSpec, tiers: list[str], tasks: list[str], metrics: Any | None = None
    ) -> None:
        self._spec = spec
        self._tiers, self._tasks = list(tiers), list(tasks)
        self._metrics = metrics
        self.library: Library = to_library(spec.library)
        self.source = "spec"
        #: Why the file's last change was refused (None: the file in use is valid, or there is none).
        self.last_error: str | None = None
        self._seen: str | None = None  # digest of the file text last looked at
        self._task: asyncio.Task | None = None
        if spec.library_file:
            self.check()
        self._gauge()

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.template_library.set(len(self.library))

    def check(self) -> bool:
        """Read the file; if it changed, validate it and swap it in. True when the library changed.
        Blocking (file I/O): call through `asyncio.to_thread` on an event loop."""
        path = self._spec.library_file
        if not path:
            return False
        try:
            text = Path(path).read_text()
        except OSError as e:
            return self._refused(f"cannot read {path}: {e.strerror}", f"unreadable:{e.errno}")
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest == self._seen:
            return False
        self._seen = digest
        try:
            spec = parse_library(text, path, self._tiers, self._tasks)
        except LibraryError as e:
            return self._refused(str(e), digest)
        library = to_library(spec)
        changed = library.digest != self.library.digest
        self.library, self.source, self.last_error = library, path, None
        if self._metrics is not None:
            self._metrics.template_reloads.labels("ok").inc()
        self._gauge()
        logger.info(
            "template library %s: %d templates, %d bindings (%s)",
            path,
            len(library),
            len(library.bindings),
            library.digest,
        )
        return changed

    def _refused(self, why: str, seen: str) -> bool:
        first = self.last_error != why
        self.last_error, self._seen = why, seen
        if first:  # once per distinct problem, not every reload_interval_s
            logger.warning(
                "template library not reloaded, keeping %s (%s): %s", self.source, self.library.digest, why
            )
            if self._metrics is not None:
                self._metrics.template_reloads.labels("invalid").inc()
        return False

    def start(self) -> None:
        """Check the file every reload_interval_s on the running loop (no file: nothing to do)."""
        if not self._spec.library_file or self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="template-library")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._spec.reload_interval_s)
            try:
                await asyncio.to_thread(self.check)
            except Exception:  # noqa: BLE001 - a reload bug must not stop later reloads
                logger.exception("template library check failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
