"""Prometheus metrics under vLLM's names, so existing dashboards work unchanged.

Each app owns its registry (several servers can live in one test process).
The engine thread calls the observe_* methods; prometheus_client is thread-safe.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_GAP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.model_name = model_name
        r = self.registry
        self.running = Gauge("vllm:num_requests_running", "Sequences in the running batch.", labels, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Sequences waiting for a slot.", labels, registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", labels, buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between tokens.", labels, buckets=TOKEN_GAP_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to finish.", labels, buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", labels, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", labels, registry=r)
        self.finished = Counter("vllm:request_success", "Finished sequences by reason.", labels + ["finished_reason"], registry=r)
        self.step_age = Gauge("longserve:engine_step_age_seconds",
                              "Seconds since the engine last made progress (a finished step, or an idle look for work).",
                              labels, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "Fraction of the KV-cache blocks in use (1 = full).", labels, registry=r)
        self.kv_tokens = Gauge("longserve:kv_cache_tokens", "Tokens the KV cache holds when full, by what it stores "
                               "(--kv-cache-dtype).", labels + ["kv_cache_dtype"], registry=r)
        self.cache_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", labels, registry=r)
        self.cache_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", labels, registry=r)
        self.preemptions = Counter("vllm:num_preemptions", "Sequences preempted to free KV-cache blocks.", labels, registry=r)
        for metric in (self.running, self.waiting, self.kv_usage, self.cache_queries, self.cache_hits, self.preemptions, self.ttft, self.itl, self.e2e, self.prompt_tokens, self.generation_tokens):
            metric.labels(model_name)  # present from the start, at zero

    def watch_step_age(self, step_age) -> None:
        """Export the engine's step age (seconds since it last made progress), read at each scrape."""
        self.step_age.labels(self.model_name).set_function(step_age)

    def watch_kv_cache(self, usage) -> None:
        """Export the KV cache's usage, a fraction read from `usage()` at each scrape."""
        self.kv_usage.labels(self.model_name).set_function(usage)

    def set_kv_cache_size(self, tokens: int, cache_dtype: str) -> None:
        self.kv_tokens.labels(self.model_name, cache_dtype).set(tokens)

    def count_prefix_cache(self, queries: int, hits: int) -> None:
        self.cache_queries.labels(self.model_name).inc(queries)
        self.cache_hits.labels(self.model_name).inc(hits)

    def count_preemptions(self, count: int) -> None:
        self.preemptions.labels(self.model_name).inc(count)

    def set_queue(self, running: int, waiting: int) -> None:
        self.running.labels(self.model_name).set(running)
        self.waiting.labels(self.model_name).set(waiting)

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.labels(self.model_name).observe(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        self.itl.labels(self.model_name).observe(seconds)

    def observe_finished(self, e2e: float, prompt_tokens: int, generation_tokens: int, reason: str) -> None:
        self.e2e.labels(self.model_name).observe(e2e)
        self.prompt_tokens.labels(self.model_name).inc(prompt_tokens)
        self.generation_tokens.labels(self.model_name).inc(generation_tokens)
        self.finished.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
