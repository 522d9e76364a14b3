"""Tandem's Locust project: the workloads of a workload file as Locust users, with token metrics.

    locust -f loadtests/locustfile.py --workload loadtests/workloads/agent-intent.yaml --host URL

(`python -m loadtests run` does this for you, headless, and writes the report.) It is a normal Locust
project: the web UI, `--headless`, `--csv`, `--html` and distributed mode (`--master` with
`--expect-workers N`, and N `--worker`s) work as usual.

- The **load shape** is `TandemShape`: the file's `shape` and `duration_s`. A closed loop runs
  `shape.users` users, each sending one job after another. An open loop runs one user per worker
  process, which sends that worker's share of a schedule planned in full at the start
  (`loadtests.plan`: every worker plans the same arrivals and sends every N-th), each job in its own
  greenlet at its due time however late the ones before it are. The test ends when every worker has
  sent its share and its requests have finished (or at `duration_s` + `--drain-s`).
- **Metrics**: every request fires Locust request events for its E2E, TTFT, TPOT, ITL, SLO and
  token counts (`loadtests.locust_events`); 429s are their own rows, by reason, never failures.
- **Records**: the workers send each request's record to the master (Locust's custom messages), which
  writes them to `--records` (JSON lines) with `--generator` (the workers' own CPU time, pacing and
  unfinished jobs), for `python -m loadtests report` and the capacity search.

State lives on the Locust `Environment` (`environment.tandem_collector` on the master or the local
runner, `environment.tandem_generator` where users run), one per test, never in module globals.
"""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import time
from pathlib import Path
from typing import Any

import gevent
import requests
from gevent.pool import Group
from locust import LoadTestShape, User, events, task
from locust.exception import StopUser
from locust.runners import MasterRunner, WorkerRunner

from loadtests import plan
from loadtests.client import Client
from loadtests.locust_events import events_of
from loadtests.prompts import PromptBuilder
from loadtests.users import JOBS, SYNTHETIC_BLOCK_TOKENS, Context
from loadtests.workload import TraceWorkload, WorkloadFile, load_workload
from serving.http.protocol import TENANT_HEADER

log = logging.getLogger("tandem.loadtest")
#: Custom messages from the workers to the master.
RECORDS, DONE = "tandem_records", "tandem_done"
#: The API key's variable when the workload file names none.
DEFAULT_KEY_ENV = "TANDEM_API_KEY"
#: Connections a generator process keeps open to the host (more requests in flight wait for one).
POOL_CONNECTIONS = 1024
#: How often a worker sends its records to the master (seconds).
FLUSH_INTERVAL_S = 1.0


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    group = parser.add_argument_group("Tandem")
    group.add_argument("--workload", env_var="TANDEM_WORKLOAD", default="", help="The workload file (YAML).")
    group.add_argument("--records", default="", help="Write every request's record here (JSON lines).")
    group.add_argument("--generator", default="", help="Write the generator's own figures here (JSON).")
    group.add_argument(
        "--rate", type=float, default=0.0, help="Open-loop rate (jobs/s) instead of the file's."
    )
    group.add_argument("--duration", type=float, default=0.0, help="Seconds of load instead of the file's.")
    group.add_argument("--drain-s", type=float, default=60.0, help="How long requests may finish after that.")


def _workload(environment: Any) -> WorkloadFile:
    opts = environment.parsed_options
    if not opts or not opts.workload:
        raise SystemExit("loadtests: give the workload file with --workload FILE (or TANDEM_WORKLOAD)")
    return load_workload(opts.workload)


class Collector:
    """The master's (or the local runner's) side: the records of every worker, and when all are done."""

    def __init__(self, environment: Any, wf: WorkloadFile) -> None:
        opts = environment.parsed_options
        self.workload = wf
        self.duration_s = opts.duration or self.workload.duration_s
        self.drain_s = opts.drain_s
        self.rate_override = bool(opts.rate)
        self.workers = max(1, opts.expect_workers) if isinstance(environment.runner, MasterRunner) else 1
        self.records: list[dict[str, Any]] = []
        self.done: dict[str, dict[str, Any]] = {}
        self.records_path, self.generator_path = opts.records, opts.generator
        environment.runner.register_message(RECORDS, self._on_records)
        environment.runner.register_message(DONE, self._on_done)

    def _on_records(self, environment: Any, msg: Any, **_: Any) -> None:
        self.records.extend(msg.data)

    def _on_done(self, environment: Any, msg: Any, **_: Any) -> None:
        self.done[str(msg.data["worker"])] = msg.data

    @property
    def finished(self) -> bool:
        return len(self.done) >= self.workers

    def write(self) -> None:
        if self.records_path:
            self.records.sort(key=lambda r: r["sent"])
            with open(self.records_path, "w") as f:
                for r in self.records:
                    f.write(json.dumps(r) + "\n")
        if self.generator_path:
            workers = list(self.done.values())
            Path(self.generator_path).write_text(
                json.dumps(
                    {
                        "workers": workers,
                        "all_done": self.finished,
                        "cpu_s": sum(w["cpu_s"] for w in workers),
                        "unfinished_jobs": sum(w["unfinished_jobs"] for w in workers),
                        "records": len(self.records),
                    },
                    indent=1,
                )
            )


class Resources:
    """What takes seconds to build (the tokenizer's word list, the traces): built when the process
    starts, in a thread of gevent's pool: a worker that blocked its event loop for them would miss
    Locust's heartbeats and be dropped by the master."""

    def __init__(self, wf: WorkloadFile) -> None:
        self.workload = wf
        self.prompts = PromptBuilder(_tokenizer(wf), SYNTHETIC_BLOCK_TOKENS)
        self.traces = {w.path: plan.trace_requests(w) for w in wf.workloads if isinstance(w, TraceWorkload)}


class Generator:
    """A process that runs users: its share of the schedule, its client state and its records."""

    def __init__(self, environment: Any) -> None:
        opts = environment.parsed_options
        self.env = environment
        self.workload = wf = _workload(environment)
        self.duration_s = opts.duration or wf.duration_s
        self.rate = opts.rate or None
        self.open_loop = wf.shape.kind != "closed" or self.rate is not None
        runner = environment.runner
        self.index = runner.worker_index if isinstance(runner, WorkerRunner) else 0
        self.workers = max(1, opts.expect_workers) if isinstance(runner, WorkerRunner) else 1
        self.headers = {}
        if wf.tenant:
            self.headers[TENANT_HEADER] = wf.tenant
        key = os.environ.get(wf.api_key_env or DEFAULT_KEY_ENV)
        if wf.api_key_env and not key:
            raise SystemExit(f"loadtests: the workload's api_key_env {wf.api_key_env} is not set")
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        pending = environment.tandem_resources
        res = pending.get() if pending is not None else None  # waits without blocking the gevent hub
        if res is None or res.workload != wf:  # a worker started without --workload: build it off the hub
            res = gevent.get_hub().threadpool.apply(Resources, (wf,))
        self.prompts, self.traces = res.prompts, res.traces
        # This worker's share of the open-loop plan (from the traces already read).
        self.arrivals: list[plan.Arrival] = []
        if self.open_loop:
            every = plan.arrivals(wf, self.rate, self.duration_s, self.traces)
            self.arrivals = plan.share(every, self.index, self.workers)
        # The clock starts once the tokenizer is loaded and the plan made, or the first arrivals would
        # all be late.
        self.start = time.perf_counter()
        self.deadline = self.start + self.duration_s
        self.cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        # One connection pool for the process, kept alive between requests (as `vllm bench serve`'s
        # aiohttp session): a new TCP connection per request would add its set-up to every TTFT.
        self.http = requests.Session()
        pool = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=POOL_CONNECTIONS)
        self.http.mount("http://", pool)
        self.http.mount("https://", pool)
        self.claimed = False
        self.jobs = Group()
        self.started_jobs = self.finished_jobs = 0
        self.users = 0
        self.pending: list[dict[str, Any]] = []
        self.sent_done = False
        self.flusher = gevent.spawn(self._flush_loop)

    def context(self, user_seed: int) -> Context:
        client = Client(self.env.host, self.emit, self.start, self.headers, self.http)
        return Context(client, self.prompts, random.Random(user_seed), self.traces)

    def emit(self, record: dict[str, Any]) -> None:
        fire = self.env.events.request.fire
        for ev in events_of(record):
            fire(**ev)
        self.pending.append(record)

    def run_job(self, ctx: Context, position: int, due: float | None, item: int) -> None:
        w = self.workload.workloads[position]
        self.started_jobs += 1
        try:
            JOBS[w.type](ctx, w, due, item)
        except Exception:  # a bug in a workload must not end the run silently
            log.exception("a %s job failed in the load generator", w.type)
        finally:
            self.finished_jobs += 1

    def _flush(self) -> None:
        if self.pending:
            batch, self.pending = self.pending, []
            self.env.runner.send_message(RECORDS, batch)

    def _flush_loop(self) -> None:
        while True:
            gevent.sleep(FLUSH_INTERVAL_S)
            self._flush()
            if not self.sent_done and time.perf_counter() > self.deadline and self.users == 0:
                self.finish()

    def finish(self) -> None:
        """Send the last records and say this worker is done (once)."""
        if self.sent_done:
            return
        self._flush()
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        cpu_s = cpu.ru_utime + cpu.ru_stime - self.cpu0.ru_utime - self.cpu0.ru_stime
        self.sent_done = True
        self.env.runner.send_message(
            DONE,
            {
                "worker": self.index,
                "cpu_s": cpu_s,
                "wall_s": time.perf_counter() - self.start,
                "jobs": self.started_jobs,
                "unfinished_jobs": self.started_jobs - self.finished_jobs,
            },
        )


def _tokenizer(wf: WorkloadFile) -> Any:
    from transformers import AutoTokenizer

    from serving.config import default_model_dir

    path = wf.tokenizer or os.path.join(os.path.expanduser(default_model_dir()), "tiny-intent")
    if not os.path.isdir(path):
        raise SystemExit(
            f"loadtests: no tokenizer at {path}: build the local models (`make models`) or set `tokenizer:` "
            "in the workload file to the served model's tokenizer directory"
        )
    return AutoTokenizer.from_pretrained(path)


@events.init.add_listener
def _init(environment: Any, **_: Any) -> None:
    environment.tandem_collector = None
    environment.tandem_generator = None
    environment.tandem_resources = None
    opts = environment.parsed_options
    if opts is None:
        return
    worker = isinstance(environment.runner, WorkerRunner)
    if worker and not opts.workload:
        return  # it gets the workload's path from the master when the test starts
    wf = _workload(environment)
    if not worker:
        environment.tandem_collector = Collector(environment, wf)
    if not isinstance(environment.runner, MasterRunner):
        environment.tandem_resources = gevent.get_hub().threadpool.spawn(Resources, wf)


@events.test_start.add_listener
def _test_start(environment: Any, **_: Any) -> None:
    if not isinstance(environment.runner, MasterRunner):
        environment.tandem_generator = Generator(environment)


@events.test_stop.add_listener
def _test_stop(environment: Any, **_: Any) -> None:
    gen = environment.tandem_generator
    if gen is not None:
        gen.finish()
        gen.flusher.kill()
    if environment.tandem_collector is not None:
        environment.tandem_collector.write()


class TandemUser(User):
    """Open loop: sends its worker's share of the schedule. Closed loop: one job after another."""

    def on_start(self) -> None:
        self.gen: Generator = self.environment.tandem_generator
        self.gen.users += 1
        seed = self.gen.workload.seed * 1_000_003 + self.gen.index * 10_007 + self.gen.users
        self.ctx = self.gen.context(seed)
        self.pick = plan.picker(self.gen.workload, random.Random(seed))

    def on_stop(self) -> None:
        self.gen.users -= 1

    @task
    def send(self) -> None:
        gen = self.gen
        if gen.open_loop:
            if not gen.claimed:
                gen.claimed = True
                self._schedule()
            raise StopUser()
        if time.perf_counter() >= gen.deadline:
            raise StopUser()
        gen.run_job(self.ctx, next(self.pick), None, 0)

    def _schedule(self) -> None:
        gen = self.gen
        log.info("worker %d sends %d jobs over %.0f s", gen.index, len(gen.arrivals), gen.duration_s)
        for a in gen.arrivals:
            wait = gen.start + a.due - time.perf_counter()
            if wait > 0:
                gevent.sleep(wait)
            # Each job on its own greenlet: a slow answer delays nothing after it.
            ctx = gen.context(gen.workload.seed * 7_919 + a.index)
            gen.jobs.spawn(gen.run_job, ctx, a.workload, a.due, a.item)
        gen.jobs.join()


class TandemShape(LoadTestShape):
    """The workload file's shape: the users, then the end when every worker is done."""

    def tick(self) -> tuple[int, float] | None:
        c = self.runner.environment.tandem_collector
        if c.finished:
            return None
        if self.get_run_time() > c.duration_s + c.drain_s:
            log.warning("requests still running %.0f s after the load ended: stopping", c.drain_s)
            return None
        wf = c.workload
        users = wf.shape.users if wf.shape.kind == "closed" and not c.rate_override else c.workers
        return users, users
