"""Serving counters rendered as Prometheus text (no client library needed)."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_SLOTS = 100  # the tokens/s window is kept as this many time slots: memory is fixed however fast tokens come


class Metrics:
    """Thread-safe counters and gauges of one server; `render` writes the Prometheus exposition format."""

    def __init__(self, window_s: float = 10.0) -> None:
        self._lock = threading.Lock()
        self.window_s = window_s
        self.requests: Counter[str] = Counter()  # finish reason -> count
        self.http_errors: Counter[int] = Counter()
        self.prompt_total = self.generated_total = self.cached_total = 0
        self.batch_count = self.batch_sum = 0
        self.batch_buckets = Counter()
        self._recent: deque[list] = deque()  # [slot start time, tokens] for tokens/s, at most _SLOTS + 1
        self.started = time.monotonic()
        self.started_wall = time.time()

    def prompt_tokens(self, n: int) -> None:
        with self._lock:
            self.prompt_total += n

    def cached_prompt_tokens(self, n: int) -> None:
        with self._lock:
            self.cached_total += n

    def tokens(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.generated_total += n
            slot = self.window_s / _SLOTS
            if self._recent and now - self._recent[-1][0] < slot:
                self._recent[-1][1] += n
            else:
                self._recent.append([now, n])
            while self._recent and (len(self._recent) > _SLOTS + 1 or self._recent[0][0] < now - self.window_s):
                self._recent.popleft()

    def batch(self, size: int) -> None:
        with self._lock:
            self.batch_count += 1
            self.batch_sum += size
            for b in _BATCH_BUCKETS:
                if size <= b:
                    self.batch_buckets[b] += 1

    def finished(self, reason: str) -> None:
        with self._lock:
            self.requests[reason] += 1

    def http_error(self, status: int) -> None:
        with self._lock:
            self.http_errors[status] += 1

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()
            span = min(self.window_s, max(now - self.started, 1e-9))
            return sum(n for _, n in self._recent) / span

    def render(self, *, queue_depth: int, running: int, resident: list[str]) -> str:
        """Prometheus text for the counters plus the given gauges."""
        tps = self.tokens_per_second()
        with self._lock:
            lines = [
                "# HELP lorakit_requests_total Finished generation requests by finish reason.",
                "# TYPE lorakit_requests_total counter",
            ]
            for reason in sorted(set(self.requests) | {"stop", "length"}):
                lines.append(f'lorakit_requests_total{{finish_reason="{reason}"}} {self.requests[reason]}')
            lines += ["# TYPE lorakit_http_errors_total counter"]
            lines += [f'lorakit_http_errors_total{{status="{s}"}} {n}' for s, n in sorted(self.http_errors.items())]
            lines += [
                "# TYPE lorakit_prompt_tokens_total counter",
                f"lorakit_prompt_tokens_total {self.prompt_total}",
                "# HELP lorakit_prompt_tokens_cached_total Prompt tokens whose keys/values came from the prefix cache.",
                "# TYPE lorakit_prompt_tokens_cached_total counter",
                f"lorakit_prompt_tokens_cached_total {self.cached_total}",
                "# TYPE lorakit_generated_tokens_total counter",
                f"lorakit_generated_tokens_total {self.generated_total}",
                f"# HELP lorakit_tokens_per_second Generated tokens per second, last {self.window_s:g} s.",
                "# TYPE lorakit_tokens_per_second gauge",
                f"lorakit_tokens_per_second {tps:.3f}",
                "# HELP lorakit_batch_size Rows per decode step.",
                "# TYPE lorakit_batch_size histogram",
            ]
            lines += [f'lorakit_batch_size_bucket{{le="{b}"}} {self.batch_buckets[b]}' for b in _BATCH_BUCKETS]
            lines += [
                f'lorakit_batch_size_bucket{{le="+Inf"}} {self.batch_count}',
                f"lorakit_batch_size_sum {self.batch_sum}",
                f"lorakit_batch_size_count {self.batch_count}",
            ]
        lines += [
            "# TYPE lorakit_queue_depth gauge",
            f"lorakit_queue_depth {queue_depth}",
            "# TYPE lorakit_running_requests gauge",
            f"lorakit_running_requests {running}",
            "# TYPE lorakit_resident_adapters gauge",
            f"lorakit_resident_adapters {len(resident)}",
        ]
        lines += [f'lorakit_adapter_resident{{adapter="{a}"}} 1' for a in resident]
        return "\n".join(lines) + "\n"
