"""Operations: API keys (compared in constant time, never logged), a per-key rate limit, Prometheus metrics.

Per-key limits on body size, body deadline and open streams are ASGI middleware: moerge.service.limits."""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from moerge.config import Settings
from moerge.experts.errors import ExpertError


class AuthError(ExpertError):
    status = 401


class ForbiddenError(ExpertError):
    status = 403


class RateLimitedError(ExpertError):
    status = 429

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = max(1, retry_after)


def same_key(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class KeyCheck:
    """Admin key for expert changes, user keys for chat. With no keys configured, all is open."""

    def __init__(self, settings: Settings):
        self.admin = settings.admin_key
        self.users = list(settings.api_keys)

    @staticmethod
    def bearer(header: str | None) -> str | None:
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    def user(self, header: str | None) -> str:
        """Who is calling a chat endpoint (the key, or 'anonymous' when chat is open)."""
        key = self.bearer(header)
        if not self.users and not self.admin:
            return key or "anonymous"
        if key is None:
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
        if any(same_key(key, k) for k in self.users) or (self.admin and same_key(key, self.admin)):
            return key
        if not self.users:
            return key or "anonymous"    # only an admin key is set: chat stays open
        raise AuthError("invalid API key")

    def admin_call(self, header: str | None) -> None:
        if not self.admin:
            return
        key = self.bearer(header)
        if key is None:
            raise AuthError("missing admin key: send 'Authorization: Bearer <admin key>'")
        if same_key(key, self.admin):
            return
        if any(same_key(key, k) for k in self.users):
            raise ForbiddenError("this key may chat but not change experts: use the admin key")
        raise AuthError("invalid API key")


class RedactQueryStrings(logging.Filter):
    """uvicorn's access log prints the whole request target. A key that a client put in the query
    string must not reach the log, so the query is replaced by '?<redacted>'."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?<redacted>", *args[3:])
        return True


def redact_access_log() -> None:
    """Install the filter on uvicorn's access logger once."""
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactQueryStrings) for f in logger.filters):
        logger.addFilter(RedactQueryStrings())


class RateLimiter:
    """Sliding one-minute window per key; 0 = unlimited."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._hits: dict[str, list[float]] = defaultdict(list)
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        if self.per_minute <= 0:
            return
        now = time.monotonic()
        with self._lock:
            hits = [t for t in self._hits[key] if now - t < 60.0]
            if len(hits) >= self.per_minute:
                self._hits[key] = hits
                wait = int(60 - (now - hits[0])) + 1
                raise RateLimitedError(f"rate limit of {self.per_minute} requests per minute reached: "
                                       f"retry in {wait} s", retry_after=wait)
            hits.append(now)
            self._hits[key] = hits


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("moerge_requests_total", "HTTP requests", ["path", "status"], registry=self.registry)
        self.latency = Histogram("moerge_request_seconds", "request latency", ["path"], registry=self.registry)
        self.routing = Histogram("moerge_routing_seconds", "routing latency", ["method"], registry=self.registry,
                                 buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.tokens = Counter("moerge_tokens_total", "tokens", ["kind"], registry=self.registry)
        self.expert_use = Counter("moerge_expert_requests_total", "requests served per expert", ["expert"],
                                  registry=self.registry)
        # the dashboard's routing, abstain, per-layer usage and queue panels (deploy/grafana/dashboards/moerge.json)
        self.decisions = Counter("moerge_routing_decisions_total", "routing decisions per method and chosen expert "
                                 "('(base)' when the router abstained)", ["method", "expert"], registry=self.registry)
        self.abstains = Counter("moerge_routing_abstain_total", "routing decisions that abstained (the base model "
                                "answered)", ["method"], registry=self.registry)
        self.layer_usage = Counter("moerge_layer_expert_usage_total", "token-level routing: each expert's share of "
                                   "a request's routing mass per layer, summed over requests", ["layer", "expert"],
                                   registry=self.registry)
        self._by_expert: dict[str, set] = {}     # expert -> (metric, label values) of its series
        self._series_lock = threading.Lock()
        self.inflight = Gauge("moerge_inflight_requests", "chat requests admitted and not yet answered (the "
                              "max_inflight limiter's count)", registry=self.registry)

    def watch_engines(self, engines) -> None:
        """Adapter placement on the vLLM servers, read from the engines at each scrape: `engines()` gives the
        system's local executors; those with `placement()` (the servers executor) are reported."""
        self.registry.register(EnginePlacementCollector(engines))

    def count_tokens(self, prompt: int, completion: int, cached: int = 0) -> None:
        """`cached`: the prompt tokens among `prompt` the engine took from its prefix cache."""
        self.tokens.labels("prompt").inc(prompt)
        self.tokens.labels("completion").inc(completion)
        self.tokens.labels("prompt_cached").inc(cached)

    def count_decision(self, method: str, chosen: list[str], abstained: bool) -> None:
        """One routing decision: per method and expert, per expert over all methods, and abstains."""
        for name in chosen[:16] if not abstained else ["(base)"]:
            self._series(self.decisions, name, method, name).inc()
            self._series(self.expert_use, name, name).inc()
        if abstained:
            self.abstains.labels(method).inc()

    def count_layer_usage(self, usage: dict[int, dict[str, float]]) -> None:
        for layer, shares in usage.items():
            for expert, share in shares.items():
                self._series(self.layer_usage, expert, str(layer), expert).inc(share)

    def _series(self, metric, expert: str, *labels: str):
        """metric.labels(*labels), remembered under `expert` so that `forget_expert` can drop it."""
        with self._series_lock:
            self._by_expert.setdefault(expert, set()).add((metric, labels))
        return metric.labels(*labels)

    def forget_expert(self, name: str) -> int:
        """Drop every series labelled with a removed expert: under churn of expert names the per-expert
        series would otherwise grow without end (in the service's memory and in Prometheus). Returns
        how many series went."""
        with self._series_lock:
            series = self._by_expert.pop(name, set())
        for metric, labels in series:
            try:
                metric.remove(*labels)
            except KeyError:
                pass
        return len(series)


class EnginePlacementCollector:
    """moerge_engine_* metrics of the vLLM servers executor (moerge/executors/vllm_servers.py)."""

    def __init__(self, engines):
        self.engines = engines

    def describe(self):
        return []       # names are known only at collection time: no duplicate check at registration

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        loads = CounterMetricFamily("moerge_engine_adapter_loads_total", "adapters loaded on an engine server",
                                    labels=["engine"])
        unloads = CounterMetricFamily("moerge_engine_adapter_unloads_total", "adapters unloaded from an engine "
                                      "server (lru: evicted for another; removed: its expert left the pool; "
                                      "reconcile: more than engine_max_loras found at start)", labels=["engine", "reason"])
        held = GaugeMetricFamily("moerge_engine_adapters", "adapters an engine server holds", labels=["engine"])
        placed = GaugeMetricFamily("moerge_engine_adapter_placement", "1 for each adapter an engine server holds",
                                   labels=["engine", "adapter"])
        up = GaugeMetricFamily("moerge_engine_up", "1 when the engine server answers its health check",
                               labels=["engine"])
        inflight = GaugeMetricFamily("moerge_engine_inflight", "requests running on an engine server",
                                     labels=["engine"])
        for ex in self.engines() or []:
            placement = getattr(ex, "placement", None)
            if placement is None:
                continue
            try:
                servers = placement()
            except Exception:  # noqa: BLE001 - a stopped executor must not break the scrape
                continue
            for e in servers:
                loads.add_metric([e["url"]], e["loads"])
                for reason in ("lru", "removed", "reconcile"):
                    unloads.add_metric([e["url"], reason], e["unloads"].get(reason, 0))
                held.add_metric([e["url"]], len(e["adapters"]))
                for key in e["adapters"]:
                    placed.add_metric([e["url"], key], 1)
                up.add_metric([e["url"]], 1 if e["up"] else 0)
                inflight.add_metric([e["url"]], e["inflight"])
        yield from (loads, unloads, held, placed, up, inflight)
