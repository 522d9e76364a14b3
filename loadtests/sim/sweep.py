"""Many simulations, in this process or as Ray tasks: what the planner's sweep runs on.

`executor(task, ctx, use_ray, workers, address)` yields an object with `submit(tag, shape, k)`,
`pending()`, `next_done() -> (tag, result)` and `close()`; each task is `task(ctx, shape_dict, k)`.
With Ray the context goes into the object store once and every task carries its reference; results
come back as they finish (`ray.wait`). `ray_session` starts a fresh local cluster (its own temp
dir, no dashboard, auth off) or joins one (`address='auto'` inside a Ray job). `Progress` is a tqdm
bar on a terminal and a plain line per finished task otherwise.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Task = Callable[[Any, dict[str, Any], int], dict[str, Any]]


class InProcess:
    """Runs each task when its result is asked for, in submission order."""

    def __init__(self, task: Task, ctx: Any) -> None:
        self.task = task
        self.ctx = ctx
        self.queue: deque[tuple[Any, dict[str, Any], int]] = deque()

    def submit(self, tag: Any, shape: Any, k: int) -> None:
        self.queue.append((tag, shape.as_dict(), k))

    def pending(self) -> int:
        return len(self.queue)

    def next_done(self) -> tuple[Any, dict[str, Any]]:
        tag, shape, k = self.queue.popleft()
        return tag, self.task(self.ctx, shape, k)

    def close(self) -> None:
        """Nothing runs ahead of `next_done`, so nothing is left to stop."""


class RayPool:
    """Each task a Ray task (Ray already initialised: `ray_session`); results as they finish."""

    def __init__(self, task: Task, ctx: Any) -> None:
        import ray

        self.ray = ray
        self.box = [ray.put(ctx)]
        self.remote = ray.remote(num_cpus=1)(task)
        self.tasks: dict[Any, Any] = {}

    def submit(self, tag: Any, shape: Any, k: int) -> None:
        self.tasks[self.remote.remote(self.box, shape.as_dict(), k)] = tag

    def pending(self) -> int:
        return len(self.tasks)

    def next_done(self) -> tuple[Any, dict[str, Any]]:
        (ref,), _ = self.ray.wait(list(self.tasks), num_returns=1)
        tag = self.tasks.pop(ref)
        return tag, self.ray.get(ref)

    def close(self) -> None:
        for ref in self.tasks:
            self.ray.cancel(ref, force=True)
        self.tasks.clear()


@contextmanager
def ray_session(workers: int | None = None, address: str | None = None) -> Iterator[None]:
    """Ray for the planner's tasks: a fresh local cluster of `workers` CPUs (default: the machine's;
    no dashboard, auth off, its own temp dir under /tmp, removed after), or the cluster at `address`
    (e.g. 'auto' inside a Ray job); shut down on exit. Reuses (and leaves) a Ray already initialised,
    so that several plans can share one cluster."""
    import ray

    if ray.is_initialized():
        yield
        return
    temp_dir = None
    if address:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    else:
        os.environ["RAY_AUTH_MODE"] = "disabled"
        temp_dir = tempfile.mkdtemp(prefix="tandem-plan-", dir="/tmp")
        ray.init(
            address="local",
            num_cpus=workers or os.cpu_count() or 1,
            include_dashboard=False,
            _temp_dir=temp_dir,
            logging_level="WARNING",
            log_to_driver=False,
        )
    try:
        yield
    finally:
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


@contextmanager
def executor(task: Task, ctx: Any, use_ray: bool, workers: int | None, address: str | None) -> Iterator[Any]:
    """`task` over `ctx`, in process or on Ray (see the module docstring)."""
    if not use_ray:
        yield InProcess(task, ctx)
        return
    with ray_session(workers, address):
        pool = RayPool(task, ctx)
        try:
            yield pool
        finally:
            pool.close()


class Progress:
    """A tqdm bar on a terminal; a plain line per finished run otherwise (None: silent)."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=0, unit="sim", file=self.stream, dynamic_ncols=True, desc="plan")

    def submitted(self) -> None:
        if self.bar is not None:
            self.bar.total += 1
            self.bar.refresh()

    def finished(self, done: int, total: int, line: str) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(line[-60:], refresh=True)
        else:
            print(f"plan: [{done}/{total}] {line}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
