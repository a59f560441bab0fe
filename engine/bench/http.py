"""HTTP service load: `pgrec serve` with N uvicorn workers, C concurrent keep-alive clients on loopback.

The data (and ranker) are those of ``pgrec bench serve`` (same database, same sizes, reused when present).
The client is a small asyncio HTTP/1.1 loop, so it takes little of the CPU the server needs.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import numpy as np

from engine.config import Settings
from engine.db import connect
from engine.sql import query


@dataclass(frozen=True)
class HttpBenchConfig:
    items: int = 100_000
    users: int = 20_000
    events: int = 2_000_000
    seconds: float = 20.0
    warmup_s: float = 3.0
    clients: int = 32
    workers: int = 2
    k: int = 10
    port: int = 8765
    reuse: bool = True
    ranker: bool = True     # False: serve with the fallback score (no training; data of an earlier run or new)
    pool_max_size: int = 8  # per worker


@dataclass
class LoadResult:
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds used during the measured window


def _cpu_by_group(groups: dict[str, Callable[[int, int, int], bool]]) -> dict[str, dict[int, float]]:
    """CPU seconds (user + system) so far of every process, by the first group whose test (pid, ppid, pgrp)
    accepts it (Linux /proc; empty elsewhere)."""
    out: dict[str, dict[int, float]] = {g: {} for g in groups}
    tick = os.sysconf("SC_CLK_TCK")
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid, pgrp = int(d.name), int(f[1]), int(f[2])
        for g, test in groups.items():
            if test(pid, ppid, pgrp):
                out[g][pid] = (int(f[11]) + int(f[12])) / tick
                break
    return out


def _database(settings: Settings, cfg: HttpBenchConfig) -> Settings:
    from engine.bench.serve import BenchConfig

    if settings.database_url:
        return settings
    d = BenchConfig()
    same = (cfg.items, cfg.users, cfg.events) == (d.items, d.users, d.events)
    name = "pgrec_bench_serve" if same else f"pgrec_bench_http_{cfg.items}_{cfg.users}_{cfg.events}"
    return settings.model_copy(update={"database_name": name})


async def _client(host: str, port: int, requests: list[bytes], stop_at: float, measure_from: float,
                  out: LoadResult, rng: random.Random) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while True:
            now = time.perf_counter()
            if now >= stop_at:
                return
            writer.write(requests[rng.randrange(len(requests))])
            t0 = time.perf_counter()
            await writer.drain()
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            await reader.readexactly(length)
            dt = (time.perf_counter() - t0) * 1e3
            status = int(status_line.split()[1]) if status_line else 0
            if t0 >= measure_from:
                out.latencies_ms.append(dt)
                out.statuses[status] = out.statuses.get(status, 0) + 1
                if status != 200:
                    out.errors += 1
    finally:
        writer.close()


async def _load(cfg: HttpBenchConfig, requests: list[bytes], seconds: float,
                groups: dict[str, Callable[[int, int, int], bool]] | None = None) -> LoadResult:
    out = LoadResult()
    start = time.perf_counter()
    measure_from = start + cfg.warmup_s
    stop_at = measure_from + seconds

    async def account() -> None:  # CPU of each group of processes over the measured window
        await asyncio.sleep(cfg.warmup_s)
        before = _cpu_by_group(groups or {})
        await asyncio.sleep(seconds)
        after = _cpu_by_group(groups or {})
        for g, procs in after.items():
            out.cpu_s[g] = sum(c - before[g].get(pid, 0.0) for pid, c in procs.items())

    tasks = [_client("127.0.0.1", cfg.port, requests, stop_at, measure_from, out, random.Random(i))
             for i in range(cfg.clients)]
    if groups:
        tasks.append(account())
    results = await asyncio.gather(*tasks, return_exceptions=True)
    out.errors += sum(1 for r in results if isinstance(r, Exception))
    out.seconds = seconds
    return out


def _postmaster_pid(settings: Settings) -> int | None:
    """The embedded server's postmaster (first line of postmaster.pid), None with PGREC_DATABASE_URL."""
    if settings.database_url:
        return None
    try:
        return int((Path(settings.data_dir).expanduser() / "pgdata" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _requests(method: str, path: str, token: str, bodies: list[bytes | None]) -> list[bytes]:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
    out = []
    for body in bodies:
        if body is None:
            out.append((head + "\r\n").encode())
        else:
            out.append((head + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                       + body)
    return out


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready within {timeout_s:.0f}s")


def _stage_p50(metrics_text: str) -> dict[str, float]:
    """Mean per funnel stage from the Prometheus histograms (sum / count)."""
    sums = dict(re.findall(r'^pgrec_stage_duration_seconds_sum\{stage="([^"]+)"\} (\S+)$', metrics_text, re.M))
    counts = dict(re.findall(r'^pgrec_stage_duration_seconds_count\{stage="([^"]+)"\} (\S+)$', metrics_text, re.M))
    return {s: float(sums[s]) / float(counts[s]) * 1e3 for s in sums if s in counts and float(counts[s])}


def _prepare_without_ranker(settings: Settings, cfg: HttpBenchConfig, say: Callable[[str], None]) -> None:
    """Data of the requested size and co-occurrence; every ranker is deactivated so the fallback score serves."""
    from engine import cooccurrence, datasets, migrate

    migrate.upgrade(settings)
    with connect(settings) as conn:
        row = conn.execute("SELECT (SELECT count(*) FROM pgrec.items), (SELECT count(*) FROM pgrec.events)").fetchone()
        n_items, n_events = row or (0, 0)
        if not (cfg.reuse and n_items == cfg.items and n_events >= 0.9 * cfg.events):
            if n_items:
                say("dropping the previous benchmark data")
                migrate.downgrade(settings, "base")
                migrate.upgrade(settings)
            say(f"generating {cfg.items:,} items / {cfg.users:,} users / {cfg.events:,} events ...")
            data = datasets.generate(datasets.GeneratorConfig(users=cfg.users, items=cfg.items, events=cfg.events,
                                                              seed=5, dim=settings.embedding_dim))
            data.load(conn)
            del data
            conn.execute("VACUUM ANALYZE")
            say("co-occurrence ...")
            cooccurrence.build(conn)
        conn.execute("UPDATE pgrec.models SET active = false WHERE active AND kind = 'ranker'")


def run(settings: Settings, cfg: HttpBenchConfig, *, write: Path | None = None,
        say: Callable[[str], None] = print) -> Iterator[str]:
    from engine.api.keys import create_key
    from engine.bench.serve import BenchConfig, _prepare, machine

    settings = _database(settings, cfg)
    yield f"machine: {machine()}"
    if cfg.ranker:
        version: int | None = _prepare(settings, BenchConfig(items=cfg.items, users=cfg.users, events=cfg.events,
                                                             reuse=cfg.reuse), say)
    else:
        _prepare_without_ranker(settings, cfg, say)
        version = None
    with connect(settings) as conn:
        users = [r[0] for r in conn.execute(query("serving.sample_users"), {"n": 5000}).fetchall()]
        counts = conn.execute(query("core.row_counts")).fetchone() or (0, 0, 0)
        token, key = create_key(conn, "bench-http", ["read"])
    ranker = f"ranker v{version}" if version else "no ranker (fallback score)"
    yield (f"data: {counts[0]:,} items, {counts[1]:,} users, {counts[2]:,} events; {ranker}; k={cfg.k}; "
           f"{cfg.workers} uvicorn workers (pool max {cfg.pool_max_size} each), {cfg.clients} keep-alive clients, "
           f"{cfg.warmup_s:.0f}s warm-up + {cfg.seconds:.0f}s measured")
    recs = _requests("POST", "/v1/recommendations", token,
                     [json.dumps({"user_id": u, "k": cfg.k}).encode() for u in users])
    with connect(settings) as conn:
        item_ids = [r[0] for r in conn.execute("SELECT item_id FROM pgrec.items ORDER BY item_key LIMIT 2000")]
    lookups = [r for i in item_ids for r in _requests("GET", f"/v1/items/{quote(i, safe='')}", token, [None])]

    env = dict(os.environ)
    env["PGREC_DATA_DIR"] = str(settings.data_dir)
    env["PGREC_DATABASE_NAME"] = settings.database_name
    env["PGREC_POOL_MAX_SIZE"] = str(cfg.pool_max_size)
    env["PGREC_LOG_LEVEL"] = "WARNING"
    if settings.database_url:
        env["PGREC_DATABASE_URL"] = settings.database_url
    metrics_dir = tempfile.mkdtemp(prefix="pgrec-bench-metrics-")
    log_path = Path(tempfile.gettempdir()) / f"pgrec-bench-http-{os.getpid()}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from engine.cli import main; main()", "serve", "--port", str(cfg.port),
             "--workers", str(cfg.workers), "--metrics-dir", metrics_dir],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_ready(cfg.port, proc)
            groups = {"service": lambda pid, ppid, pgrp: pgrp == proc.pid}
            postmaster = _postmaster_pid(settings)
            if postmaster is not None:  # the embedded server: every database's backends (nothing else should run)
                groups["database"] = lambda pid, ppid, pgrp: pid == postmaster or ppid == postmaster
            result = asyncio.run(_load(cfg, recs, cfg.seconds, groups))
            # the service alone: an authenticated primary-key lookup, to separate HTTP cost from the funnel
            plain = asyncio.run(_load(cfg, lookups, min(cfg.seconds, 10.0)))
            with urllib.request.urlopen(f"http://127.0.0.1:{cfg.port}/metrics", timeout=5) as r:
                stages = _stage_p50(r.read().decode())
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    with connect(settings) as conn:
        from engine.api.keys import revoke_key

        revoke_key(conn, key.key_id)

    lat = np.asarray(result.latencies_ms) if result.latencies_ms else np.asarray([float("nan")])
    ok = sum(n for s, n in result.statuses.items() if s == 200)
    rps = ok / result.seconds
    p50, p95, p99 = (float(np.percentile(lat, q)) for q in (50, 95, 99))
    table = ["| measure | value |", "|---|---|",
             f"| recommendations/s | {rps:,.0f} |",
             f"| latency p50 / p95 / p99 (ms, client side) | {p50:.1f} / {p95:.1f} / {p99:.1f} |",
             f"| errors (non-200 or failed connections) | {result.errors} |",
             f"| requests measured | {len(result.latencies_ms):,} |"]
    table += [f"| server mean, stage {s} (ms) | {v:.2f} |" for s, v in sorted(stages.items())]
    measured = len(result.latencies_ms)
    for g, secs in sorted(result.cpu_s.items()):
        if measured:
            whose = ("the service's processes" if g == "service"
                     else "the embedded PostgreSQL server, all its processes")
            table.append(f"| CPU per recommendation, {whose} (ms) | {secs * 1e3 / measured:.1f} |")
    plain_lat = np.asarray(plain.latencies_ms) if plain.latencies_ms else np.asarray([float("nan")])
    table.append(f"| for comparison: GET /v1/items/{{id}} (auth + one primary-key read) | "
                 f"{sum(n for st, n in plain.statuses.items() if st == 200) / plain.seconds:,.0f}/s, "
                 f"p50 {np.percentile(plain_lat, 50):.1f} ms, p99 {np.percentile(plain_lat, 99):.1f} ms, "
                 f"{plain.errors} errors |")
    goals = [f"recommendations/s = {rps:,.0f} (goal >= 400): {'met' if rps >= 400 else 'NOT met'}",
             f"p99 = {p99:.1f} ms (goal <= 60 ms): {'met' if p99 <= 60 else 'NOT met'}",
             f"errors = {result.errors} (goal 0): {'met' if result.errors == 0 else 'NOT met'}"]
    load = os.getloadavg()[0]
    goals.append(f"load average at the end of the run: {load:.1f} (2 cores; other work shares the machine)")
    yield from table
    yield from goals
    yield f"server log: {log_path}"
    if write is not None:
        _write(write, cfg, machine(), counts, table, goals)
        yield f"written to {write} (section HTTP)"


def _write(path: Path, cfg: HttpBenchConfig, mach: str, counts: tuple[int, ...], table: list[str],
           goals: list[str]) -> None:
    cmd = (f"pgrec bench http --items {cfg.items} --users {cfg.users} --events {cfg.events} "
           f"--seconds {cfg.seconds:g} --clients {cfg.clients} --workers {cfg.workers}"
           f"{'' if cfg.ranker else ' --no-ranker'} --write {path}")
    body = "\n".join([
        "## HTTP", "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {mach}; embedded PostgreSQL + pgvector on the same "
        f"machine as the server and the load generator; {counts[0]:,} items, {counts[1]:,} users, "
        f"{counts[2]:,} events; every request logged as impressions; other work may have shared the machine.", "",
        f"Command: `{cmd}`", "", *table, "", *[f"- {g}" for g in goals], "", ""])
    text = path.read_text() if path.is_file() else "# Benchmarks\n\nOne section per part; each names its command.\n\n"
    pattern = re.compile(r"^## HTTP\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    text = pattern.sub(lambda _: body, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + body
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
