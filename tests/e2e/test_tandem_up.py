"""`tandem up` as a user runs it: serves both models, then stops everything on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import openai
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.e2e


def test_up_serves_then_stops_cleanly() -> None:
    port, dash = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "up", "--port", str(port), "--dashboard-port", str(dash)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ.copy(),
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Tandem is serving"):
                break
        assert any(line.startswith("Tandem is serving") for line in lines), "".join(lines[-40:])
        assert f"http://127.0.0.1:{port}/v1" in lines[-1]

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        for model in ("tiny-intent", "tiny-reasoning"):
            text = "".join(
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=8,
                    stream=True,
                    # tiny-reasoning's answer comes after its (budgeted) hidden reasoning.
                    extra_body={"max_reasoning_tokens": 2} if model == "tiny-reasoning" else {},
                )
                if c.choices
            )
            assert text

        status = subprocess.run(
            [sys.executable, "-m", "serving.cli", "status", "--dashboard", f"http://127.0.0.1:{dash}"],
            capture_output=True,
            text=True,
            timeout=180,  # a CLI starting next to a loaded 2-core stack can be slow
        )
        assert status.returncode == 0 and "tiny-reasoning-decode" in status.stdout

        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, rest[-3000:]
        assert "Tandem stopped." in rest
        # Nothing it started is left: no process still refers to its own Ray temp dir.
        import psutil

        from serving.cli import ray_temp_dir

        temp = ray_temp_dir(port)
        time.sleep(2)
        left = [
            p.info["pid"]
            for p in psutil.process_iter(["pid", "cmdline"])
            if any(temp in a for a in (p.info["cmdline"] or []))
        ]
        assert not left, f"processes left behind: {left}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
