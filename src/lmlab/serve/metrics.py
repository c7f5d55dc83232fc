"""Prometheus metrics of the server, in the text exposition format (no client library needed).

Counters and histograms are updated on the event loop as requests go; gauges (running rows,
waiting requests, batch occupancy) are read from each engine when ``/metrics`` is scraped.
"""

from __future__ import annotations

import bisect
import threading

# Upper bounds of the histogram buckets (s).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0)
TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
REQUEST_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    escaped = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in labels.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, escaped)) + "}"


class Counter:
    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self.values: dict[tuple, float] = {}

    def inc(self, value: float = 1.0, **labels) -> None:
        key = tuple(labels.items())
        self.values[key] = self.values.get(key, 0.0) + value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_labels(dict(k))} {v:g}" for k, v in self.values.items()]
        return lines


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self.series: dict[tuple, list] = {}  # labels -> [counts per bucket (+Inf last), sum, count]

    def observe(self, value: float, **labels) -> None:
        key = tuple(labels.items())
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = [[0] * (len(self.buckets) + 1), 0.0, 0]
        s[0][bisect.bisect_left(self.buckets, value)] += 1
        s[1] += value
        s[2] += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, (counts, total, n) in self.series.items():
            labels, cumulative = dict(key), 0
            for bound, c in zip((*self.buckets, float("inf")), counts):
                cumulative += c
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(f"{self.name}_bucket{_labels({**labels, 'le': le})} {cumulative}")
            lines.append(f"{self.name}_sum{_labels(labels)} {total:.6g}")
            lines.append(f"{self.name}_count{_labels(labels)} {n}")
        return lines


class ServerMetrics:
    """Everything /metrics shows. ``engines``: model name -> BatchEngine, read at scrape time."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = Counter("lmlab_requests_total", "Requests answered, by model, endpoint and HTTP status.")
        self.prompt_tokens = Counter("lmlab_prompt_tokens_total", "Prompt tokens prefilled.")
        self.generation_tokens = Counter("lmlab_generation_tokens_total", "Tokens generated.")
        self.ttft = Histogram(
            "lmlab_time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token (s).",
            TTFT_BUCKETS,
        )
        self.token_latency = Histogram(
            "lmlab_time_per_output_token_seconds",
            "Time between two generated tokens of one sequence (s).",
            TOKEN_LATENCY_BUCKETS,
        )
        self.request_latency = Histogram(
            "lmlab_e2e_request_latency_seconds",
            "Time from a request's arrival to its answer (s).",
            REQUEST_LATENCY_BUCKETS,
        )

    def request_done(self, model: str | None, endpoint: str, status: int, latency_s: float | None = None) -> None:
        with self._lock:
            self.requests.inc(model=model or "", endpoint=endpoint, status=str(status))
            if latency_s is not None and status == 200:
                self.request_latency.observe(latency_s, model=model or "")

    def tokens(self, model: str, prompt: int, generated: int) -> None:
        with self._lock:
            self.prompt_tokens.inc(prompt, model=model)
            self.generation_tokens.inc(generated, model=model)

    def first_token(self, model: str, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds, model=model)

    def next_token(self, model: str, seconds: float) -> None:
        with self._lock:
            self.token_latency.observe(seconds, model=model)

    def render(self, engines: dict) -> str:
        with self._lock:
            lines = []
            for metric in (
                self.requests,
                self.prompt_tokens,
                self.generation_tokens,
                self.ttft,
                self.token_latency,
                self.request_latency,
            ):
                lines += metric.render()
        stats = {name: engine.stats() for name, engine in engines.items()}
        gauges = [
            ("lmlab_num_requests_running", "gauge", "Sequences decoding in the batch now.", lambda s: s["active"]),
            (
                "lmlab_num_requests_waiting",
                "gauge",
                "Requests waiting in the queue for a place in the batch.",
                lambda s: s["queued"],
            ),
            (
                "lmlab_batch_occupancy",
                "gauge",
                "Fraction of the batch's places in use (running / max batch).",
                lambda s: s["active"] / s["max_batch"] if s["max_batch"] else 0.0,
            ),
            ("lmlab_max_batch", "gauge", "Places in the batch (--max-batch).", lambda s: s["max_batch"]),
            ("lmlab_engine_steps_total", "counter", "Decoding steps the engine ran.", lambda s: s.get("steps", 0)),
            (
                "lmlab_engine_busy_seconds_total",
                "counter",
                "Seconds the engine's worker spent computing.",
                lambda s: s.get("busy_s", 0.0),
            ),
        ]
        for name, kind, help, value in gauges:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{_labels({'model': model})} {value(s):g}" for model, s in stats.items()]
        return "\n".join(lines) + "\n"
