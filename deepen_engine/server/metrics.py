"""The server's Prometheus metrics (`GET /metrics`, rendered by `prometheus-client`), named
as vLLM names its own with a `deepen_` prefix, and one log line per request.

Per request (`RequestMeter`, fed by the app as the answer's events pass):
    deepen_request_success_total{finish_reason}   choices finished: stop, length, tool_calls
    deepen_request_failure_total{reason}          requests failed: timeout, aborted, error
    deepen_http_requests_total{endpoint,status}   every answered HTTP request
    deepen_prompt_tokens_total                    prompt tokens (main member's tokens)
    deepen_generation_tokens_total                tokens generated
    deepen_time_to_first_token_seconds            arrival -> first token handed out
    deepen_time_per_output_token_seconds          (last - first token) / (tokens - 1)
    deepen_request_queue_time_seconds             arrival -> the row joined the batch
    deepen_e2e_request_latency_seconds            arrival -> last event
Read from the engine when scraped (no cost per step beyond two additions):
    deepen_num_requests_running / _waiting        rows decoding, requests waiting
    deepen_kv_cache_bytes                         KV caches of running and waiting rows (in process)
    deepen_fused_steps_total, deepen_gated_steps_total   row-steps fused / skipped by the gate
    deepen_member_forward_seconds_total{member}   time in each member's forward passes
    deepen_fusion_seconds_total                   time in fusion (`Fuser.fuse`, every fuser)
    deepen_relative_rows_cached{member}           DeePEn relative rows each member caches
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..outputs import StreamEvent, Usage
from .responses import finish_reason

if TYPE_CHECKING:
    from ..ensemble import Ensemble

log = logging.getLogger("deepen.server")

# buckets as vLLM's: short steps on a CPU are tens of ms, a long queue is minutes
_TTFT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 640)
_TPOT = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5)
_LATENCY = (0.1, 0.3, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The metrics of one app, in a registry of its own (two apps in one process, as in
    the tests, never share counts).
    """

    def __init__(self, ensemble: Callable[[], Ensemble | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.success = Counter(
            "deepen_request_success", "Choices finished, by finish reason.", ["finish_reason"],
            registry=r,
        )  # fmt: skip
        self.failure = Counter(
            "deepen_request_failure", "Requests failed, by reason.", ["reason"], registry=r
        )
        self.http = Counter(
            "deepen_http_requests", "HTTP requests answered.", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter(
            "deepen_prompt_tokens", "Prompt tokens (main member's).", registry=r
        )
        self.generation_tokens = Counter(
            "deepen_generation_tokens", "Generated tokens.", registry=r
        )
        self.ttft = Histogram(
            "deepen_time_to_first_token_seconds", "Arrival to first token.", buckets=_TTFT,
            registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "deepen_time_per_output_token_seconds", "Time per token after the first.",
            buckets=_TPOT, registry=r,
        )  # fmt: skip
        self.queue = Histogram(
            "deepen_request_queue_time_seconds", "Arrival to joining the batch.",
            buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "deepen_e2e_request_latency_seconds", "Arrival to the last event.",
            buckets=_LATENCY, registry=r,
        )  # fmt: skip
        r.register(_EngineCollector(ensemble))

    def render(self) -> bytes:
        """The text format of every metric."""
        return generate_latest(self.registry)


class _EngineCollector:
    """Reads the engine's own counters at scrape time."""

    def __init__(self, ensemble: Callable[[], Ensemble | None]) -> None:
        self.ensemble = ensemble

    def collect(self) -> Iterator[Metric]:
        ens = self.ensemble()
        state = ens.queue_state() if ens is not None else {}
        yield GaugeMetricFamily(
            "deepen_num_requests_running", "Rows decoding now.", state.get("running_rows", 0)
        )
        yield GaugeMetricFamily(
            "deepen_num_requests_waiting",
            "Requests waiting to start.",
            state.get("waiting_requests", 0),
        )
        yield GaugeMetricFamily(
            "deepen_kv_cache_bytes",
            "Bytes of the running rows' KV caches and of the prefill waiting rows hold "
            "(members in this process).",
            state.get("kv_cache_bytes", 0),
        )
        context = ens.fuser.context if ens is not None else None
        fused = context.fusion_rows if context is not None else 0
        gated = context.gated_rows if context is not None else 0
        yield CounterMetricFamily(
            "deepen_fused_steps", "Row-steps that asked for fusion (gated ones included).", fused
        )
        yield CounterMetricFamily(
            "deepen_gated_steps", "Row-steps the gate answered with the main member.", gated
        )
        yield CounterMetricFamily(
            "deepen_fusion_seconds",
            "Time in fusion (the members' logits to the fused ones).",
            context.fusion_seconds if context is not None else 0.0,
        )
        seconds = CounterMetricFamily(
            "deepen_member_forward_seconds", "Time in each member's forwards.", labels=["member"]
        )
        for member in ens.members if ens is not None else []:
            seconds.add_metric([member.name], member.forward_seconds)
        yield seconds
        rows = GaugeMetricFamily(
            "deepen_relative_rows_cached", "DeePEn relative rows cached per member (LRU).",
            labels=["member"],
        )  # fmt: skip
        counts = context.rows_cached() if context is not None else []
        for member, count in zip(ens.members if ens is not None else [], counts):
            rows.add_metric([member.name], count)
        yield rows


class RequestMeter:
    """One request's timings and counts, recorded as its events pass, then added to the
    metrics and logged in one line by `finish`.
    """

    def __init__(self, metrics: Metrics, endpoint: str, request_id: str | None = None) -> None:
        self.metrics = metrics
        self.endpoint = endpoint
        self.id = request_id or f"req-{uuid.uuid4().hex[:16]}"
        self.arrival = time.perf_counter()
        self.first: float | None = None  # first token handed out
        self.last: float | None = None
        self.reasons: list[str] = []
        self.usages: list[Usage] = []
        self.main = ""
        self.done = False

    def event(self, event: StreamEvent) -> None:
        """Note one engine event (tokens, a finish)."""
        now = time.perf_counter()
        if event.delta or event.tool_calls or event.logprobs:
            if self.first is None:
                self.first = now
            self.last = now
        if event.finish_reason is not None:
            self.reasons.append(finish_reason(event.finish_reason) or "stop")
            self.last = now
            if event.usage is not None:
                self.usages.append(event.usage)

    def finish(self, status: int, failure: str | None = None) -> None:
        """Record the request once: its counts, its histograms and its log line."""
        if self.done:
            return
        self.done = True
        m, end = self.metrics, time.perf_counter()
        m.http.labels(self.endpoint, str(status)).inc()
        if failure is not None:
            m.failure.labels(failure).inc()
        else:  # a request counts once: a stream dropped after its rows ended is aborted
            for reason in self.reasons:
                m.success.labels(reason).inc()
        prompt = sum(u.token_counts(self.main)["prompt_tokens"] for u in self.usages)
        generated = sum(u.completion_tokens for u in self.usages)
        m.prompt_tokens.inc(prompt)
        m.generation_tokens.inc(generated)
        if self.first is not None:
            m.ttft.observe(self.first - self.arrival)
            if generated > 1 and self.last is not None:
                m.tpot.observe((self.last - self.first) / (generated - 1))
        if self.usages:
            # the rows ran for total_seconds of the request's life; the rest was waiting
            running = max(u.total_seconds for u in self.usages)
            m.queue.observe(max(0.0, end - self.arrival - running))
        m.latency.observe(end - self.arrival)
        log.info(
            "%s %s status=%d finish=%s prompt_tokens=%d generated_tokens=%d seconds=%.3f%s",
            self.id, self.endpoint, status, ",".join(self.reasons) or "-", prompt, generated,
            end - self.arrival, f" failure={failure}" if failure else "",
        )  # fmt: skip
