"""Prometheus metrics, named like vLLM's with the prefix ``afsplit:`` and a ``model_name`` label.

Gauges are set by the engine loop after each step; counters and latency histograms are fed by the
request handlers as tokens reach them (so the latencies are what a client of this process sees).
Each server has its own registry (several servers can live in one test process).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from afsplit.server.engine_core import Load


def _log_buckets(lo: float, hi: float, per_decade: int = 4) -> list[float]:
    out, i = [], 0
    while lo * 10 ** (i / per_decade) <= hi * 1.0001:
        out.append(float(f"{lo * 10 ** (i / per_decade):.3g}"))
        i += 1
    return out


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, exchanges: bool):
        r = self.registry = CollectorRegistry()
        label = ["model_name"]

        def one(metric):
            return metric.labels(model_name)

        self.running = one(Gauge("afsplit:num_requests_running", "Requests in the running batch.", label, registry=r))
        self._waiting = one(Gauge("afsplit:num_requests_waiting", "Requests accepted but not running yet.", label,
                                  registry=r))
        self.kv_usage = one(Gauge("afsplit:kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).",
                                  label, registry=r))
        self.prompt_tokens = one(Counter("afsplit:prompt_tokens", "Prompt tokens of accepted requests.", label,
                                         registry=r))
        self.generation_tokens = one(Counter("afsplit:generation_tokens", "Generated tokens.", label, registry=r))
        self._success = Counter("afsplit:request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self._model = model_name
        self.ttft = one(Histogram("afsplit:time_to_first_token_seconds", "Time to the first generated token.", label,
                                  buckets=_log_buckets(1e-3, 2560), registry=r))
        self.itl = one(Histogram("afsplit:inter_token_latency_seconds", "Time between consecutive tokens.", label,
                                 buckets=_log_buckets(1e-3, 80), registry=r))
        self.e2e = one(Histogram("afsplit:e2e_request_latency_seconds", "Arrival to the last token.", label,
                                 buckets=_log_buckets(1e-2, 7680), registry=r))
        self.failovers = one(Counter("afsplit:failovers", "Recoveries from a lost rank (comm.failover).", label,
                                     registry=r))
        self.failover_detection = one(Histogram(
            "afsplit:failover_detection_seconds", "From a lost rank's last sign of life to the start of recovery.",
            label, buckets=_log_buckets(1e-3, 100.0), registry=r))
        self.failover_recovery = one(Histogram(
            "afsplit:failover_recovery_seconds", "From the start of a recovery to serving again.", label,
            buckets=_log_buckets(1e-3, 100.0), registry=r))
        self.failover_replayed = one(Counter("afsplit:failover_requests_replayed",
                                             "Requests whose step was run again after a recovery.", label, registry=r))
        self._exchange = None
        if exchanges:
            self._exchange = Histogram(
                "afsplit:moe_exchange_seconds_per_layer",
                "Seconds per MoE layer and attention rank in dispatch or combine, per engine step (host time unless "
                "runtime.profile is on).", ["model_name", "phase"], buckets=_log_buckets(1e-5, 1.0), registry=r)

    def set_load(self, load: Load) -> None:
        self.running.set(load.running)
        self.kv_usage.set(load.kv_usage)

    def set_waiting(self, n: int) -> None:
        self._waiting.set(n)

    def observe_exchange(self, seconds: dict[str, float]) -> None:
        if self._exchange is not None:
            for phase, s in seconds.items():
                self._exchange.labels(self._model, phase).observe(s)

    def observe_failovers(self, records: list[dict]) -> None:
        for rec in records:
            self.failovers.inc()
            self.failover_detection.observe(rec["detection_s"])
            self.failover_recovery.observe(rec["recovery_s"])
            self.failover_replayed.inc(rec.get("requests_replayed", 0))

    def finished(self, reason: str) -> None:
        self._success.labels(self._model, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
