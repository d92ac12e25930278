"""A streaming OpenAI client for fault tests: every request ends in exactly one recorded outcome
(ok, error, aborted by us) and never hangs; plus the "nothing lost" check."""

from __future__ import annotations

import asyncio
import collections
import datetime
import json
import os
import platform
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import httpx

from pdmesh.rpc.tls import PLAINTEXT, TlsConfig
from tests.meshproc import gateway_books, scrape, wait_idle

KV_LEASE = 8.0
"""--kv-lease-seconds of the fault meshes' prefill workers."""
HEARTBEAT = 1.0
LOST_WITHIN = KV_LEASE + 2 * HEARTBEAT + 2.0
"""Seconds after which everything must be back at baseline (lease + 2 heartbeats, + scrape slack)."""
WORKER_ARGS = ("--kv-lease-seconds", str(KV_LEASE), "--async-scheduling", "on", "--kv-audit")
"""The fault meshes decode async and audit KV contents (``nothing_lost`` checks the audit)."""


@dataclass
class Outcome:
    kind: str
    """ok | error | aborted (we disconnected) | truncated (stream ended with neither finish nor error: a bug)."""
    status: int = 0
    finish_reason: Optional[str] = None
    text: str = ""
    error: Optional[dict] = None
    chunks: int = 0
    seconds: float = 0.0
    retry_after: Optional[str] = None


@dataclass
class Tally:
    sent: int = 0
    outcomes: list[Outcome] = field(default_factory=list)

    def add(self, o: Outcome) -> Outcome:
        self.outcomes.append(o)
        return o

    def count(self, kind: str) -> int:
        return sum(o.kind == kind for o in self.outcomes)

    def statuses(self) -> dict[str, int]:
        return dict(collections.Counter(f"{o.kind}:{o.status}" for o in self.outcomes))

    def summary(self) -> dict:
        return {"sent": self.sent, "ok": self.count("ok"), "errors": self.count("error") + self.count("truncated"),
                "aborted": self.count("aborted"), "by_outcome": self.statuses()}

    def assert_balanced(self) -> None:
        s = self.summary()
        assert s["sent"] == s["ok"] + s["errors"] + s["aborted"], s
        assert self.count("truncated") == 0, "a stream ended without finish_reason or error"


def body(prompt, max_tokens: int = 16, **kw) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True, **kw}


async def stream(client: httpx.AsyncClient, tally: Tally, payload: dict, cut_after_chunks: Optional[int] = None,
                 cut_after_seconds: Optional[float] = None, timeout: float = 60.0, path: str = "/v1/completions",
                 on_chunk: Optional[Callable[[int], None]] = None) -> Outcome:
    """POST a streaming request; disconnect after ``cut_after_chunks`` content chunks or
    ``cut_after_seconds`` (an 'aborted' outcome).  A request that outlives ``timeout`` fails the test."""
    tally.sent += 1
    t0 = time.monotonic()
    o = Outcome("truncated")

    async def go() -> None:
        async with client.stream("POST", path, json=payload) as r:
            o.status = r.status_code
            o.retry_after = r.headers.get("retry-after")
            if r.status_code != 200:
                raw = await r.aread()
                o.kind = "error"
                o.error = json.loads(raw).get("error") if raw.startswith(b"{") else {"raw": raw[:200].decode(errors="replace")}
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    if o.finish_reason is not None and o.kind != "error":
                        o.kind = "ok"
                    return
                obj = json.loads(data)
                if "error" in obj:
                    o.kind, o.error = "error", obj["error"]
                    continue  # the stream must close right after it
                for ch in obj.get("choices", []):
                    o.text += ch.get("text") or (ch.get("delta") or {}).get("content") or ""
                    o.finish_reason = ch.get("finish_reason") or o.finish_reason
                o.chunks += 1
                if on_chunk is not None:
                    on_chunk(o.chunks)
                if cut_after_chunks is not None and o.chunks >= cut_after_chunks:
                    o.kind = "aborted"
                    return

    try:
        if cut_after_seconds is not None:
            try:
                await asyncio.wait_for(go(), cut_after_seconds)
            except asyncio.TimeoutError:
                o.kind = "aborted"
        else:
            await asyncio.wait_for(go(), timeout)
    except httpx.TransportError as exc:
        o.kind, o.error = "error", {"transport": repr(exc)}
    o.seconds = time.monotonic() - t0
    return tally.add(o)


def books_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in before}


def nothing_lost(scheduler: str, gateway_metrics: Optional[str], tally: Tally, before_books: Optional[dict] = None,
                 expect_workers: Optional[int] = None, tls: TlsConfig = PLAINTEXT) -> int:
    """Everything back at baseline within ``LOST_WITHIN`` s; the books balance.  Returns blocks leaked (0).
    ``tls``: how to reach the scheduler."""
    tally.assert_balanced()
    ws = wait_idle(scheduler, LOST_WITHIN, expect_workers, tls)
    leaked = sum(w.load.total_blocks - w.load.free_blocks + w.load.held_blocks for w in ws)
    time.sleep(0.6)  # workers refresh their counters every 0.5 s
    for w in ws:
        if w.info.metrics_port:
            url = f"http://{w.info.address.rsplit(':', 1)[0]}:{w.info.metrics_port}/metrics"
            changed = scrape(url).get("pdmesh:kv_audit_mismatches_total", 0)
            assert changed == 0, f"{w.info.worker_id}: {changed} KV blocks changed under their owner (--kv-audit)"
    if gateway_metrics and before_books is not None:
        deadline = time.monotonic() + 5
        while True:
            now = gateway_books(gateway_metrics)
            d = books_delta(before_books, now)
            balanced = d["received"] == d["rejected"] + d["ok"] + d["failed"] + d["aborted"]
            if (balanced and now["running"] == 0) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert balanced, d
        # a client that hangs up within milliseconds may be gone before the gateway read its request
        unanswered = sum(o.kind == "aborted" and o.status == 0 for o in tally.outcomes)
        assert tally.sent - unanswered <= d["received"] <= tally.sent, (d, tally.summary())
    return leaked


API_KEY = "fault-suite-key"
"""The key of the shared fault mesh's gateway."""


def make_client(base: str, api_key: str | None = API_KEY, connections: int = 64):
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(base_url=base, headers=headers, timeout=httpx.Timeout(60.0, connect=5.0),
                             limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))


def greedy(svc, prompt: list[int], max_tokens: int) -> str:
    """One greedy completion of token ids through ``svc``'s gateway (a ``Services`` mesh); its text."""
    r = httpx.post(svc.base + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                   json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


class SuiteReport:
    """The figures of a suite's run (one entry per test), written to ``path`` at the end of the
    session (only when a test added one).  The committed results/cpu/*.json are refreshed only when
    asked (``--fault-report``, ``--security-report``); otherwise ``path`` is in the run's temporary
    directory, so that an ordinary run leaves the tree clean."""

    def __init__(self, path: Path, command: str, tag: str) -> None:
        self.path, self.command, self.tag = path, command, tag
        self.entries: dict[str, dict] = {}

    def add(self, name: str, tally: Tally, faults_injected: int, blocks_leaked: int, **extra) -> None:
        self.entries[name] = {"faults_injected": faults_injected, **tally.summary(), "blocks_leaked": blocks_leaked, **extra}
        print(f"\n[{self.tag}] {name}: {json.dumps(self.entries[name])}")

    def write(self) -> None:
        if not self.entries:
            return
        totals = {k: sum(e.get(k, 0) for e in self.entries.values())
                  for k in ("faults_injected", "sent", "ok", "errors", "aborted", "blocks_leaked")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
            "commit": _commit(), "command": self.command,
            "totals": totals, "tests": self.entries}, indent=1) + "\n")
        print(f"\n[{self.tag}] figures written to {self.path}")


def report_path(request, tmp_path_factory, option: str, name: str) -> Path:
    """Where a suite writes its figures: the path given with ``option``, else ``name`` in the run's
    temporary directory."""
    given = request.config.getoption(option)
    return Path(given) if given else tmp_path_factory.getbasetemp() / name


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


class Load:
    """Streams from ``loops`` client loops in a background thread until ``finish()``; keeps
    (time, outcome, status) of every request."""

    def __init__(self, base: str, max_tokens: int = 24, loops: int = 4, api_key: Optional[str] = API_KEY) -> None:
        self.base, self.max_tokens, self.loops, self.api_key = base, max_tokens, loops, api_key
        self.tally = Tally()
        self.timeline: list[tuple[float, str, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.thread.start()

    async def _main(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async with httpx.AsyncClient(base_url=self.base, headers=headers, timeout=httpx.Timeout(60.0, connect=5.0)) as c:
            async def loop_(i: int) -> None:
                while not self.stop.is_set():
                    o = await stream(c, self.tally, body(list(range(500 + i, 560 + i)), self.max_tokens), timeout=60)
                    self.timeline.append((time.monotonic(), o.kind, o.status))
                    if o.kind != "ok":
                        await asyncio.sleep(0.2)

            await asyncio.gather(*(loop_(i) for i in range(self.loops)))

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(90)
        assert not self.thread.is_alive(), "load hung"
