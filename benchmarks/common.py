"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class BenchmarkError(RuntimeError):
    """A request failed where none may, or the stack misbehaved: the figures would be meaningless."""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (q in 0..100, linear interpolation, as numpy's default); NaN for no values."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def int_list(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated positive integers, in the order given."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def machine_info(**versions: str) -> dict[str, Any]:
    """What the figures were measured on: cores, platform, Python, vLLM and torch, plus `versions`."""
    import torch
    import vllm

    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        **versions,
    }


def finite(obj: Any) -> Any:
    """`obj` with NaN/inf floats as None (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def run_main(
    argv: list[str] | None,
    parse_args: Callable[[list[str] | None], tuple[Any, str | None]],
    run: Callable[[Any], dict[str, Any]],
    format_report: Callable[[dict[str, Any]], str],
) -> int:
    """A benchmark's `main`: parse, run, print the report, write the JSON; 1 on a BenchmarkError."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params, json_path = parse_args(argv)
    try:
        result = run(params)
    except BenchmarkError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 1
    print(format_report(result), flush=True)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(finite(result), indent=2) + "\n")
        print(f"results written to {json_path}")
    return 0
