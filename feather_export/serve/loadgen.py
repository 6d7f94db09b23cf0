"""A closed-loop load generator for the chat-completions endpoint.

``concurrency`` clients each send one streamed request, wait for its end, and send the next, for
``duration`` seconds or until ``requests`` have been sent in all. Per request it records the
latency (send to the end of the stream), the TTFT (send to the first chunk with content), the
completion tokens (the stream's usage chunk) and any error. ``summarize`` gives throughput and
percentiles. Needs the ``openai`` client.
"""
from __future__ import annotations

import base64
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from feather_export.errors import FeatherError


@dataclass(frozen=True)
class LoadConfig:
    url: str                             # server root, e.g. http://127.0.0.1:8000
    model: str
    image: Path
    question: str = "Where is the red square?"
    max_tokens: int = 16
    concurrency: int = 4
    duration: float | None = 20.0        # seconds; None: stop after ``requests``
    requests: int | None = None          # total; None: stop after ``duration``

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise FeatherError(f"--concurrency must be at least 1, got {self.concurrency}")
        if self.duration is None and self.requests is None:
            raise FeatherError("give a duration (--duration) or a request count (--requests)")
        if self.requests is not None and self.requests < 1:
            raise FeatherError(f"--requests must be at least 1, got {self.requests}")


@dataclass
class Sample:
    client: int
    start: float                         # seconds since the run started
    latency: float | None = None
    ttft: float | None = None
    completion_tokens: int | None = None
    error: str | None = None


def run_load(config: LoadConfig) -> list[Sample]:
    import openai

    data = base64.b64encode(Path(config.image).read_bytes()).decode()
    messages = [{"role": "user", "content": [
        {"type": "text", "text": config.question},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}]}]
    client = openai.OpenAI(base_url=config.url.rstrip("/") + "/v1", api_key="unused",
                           max_retries=0, timeout=120)
    samples: list[Sample] = []
    lock = threading.Lock()
    budget = [config.requests]
    t0 = time.perf_counter()
    end = None if config.duration is None else t0 + config.duration

    def take() -> bool:
        with lock:
            if end is not None and time.perf_counter() >= end:
                return False
            if budget[0] is not None:
                if budget[0] == 0:
                    return False
                budget[0] -= 1
            return True

    def worker(index: int) -> None:
        while take():
            sample = Sample(index, time.perf_counter() - t0)
            start = time.perf_counter()
            try:
                stream = client.chat.completions.create(
                    model=config.model, messages=messages, max_tokens=config.max_tokens,
                    temperature=0, stream=True, stream_options={"include_usage": True})
                for chunk in stream:
                    if sample.ttft is None and chunk.choices and chunk.choices[0].delta.content:
                        sample.ttft = time.perf_counter() - start
                    if chunk.usage is not None:
                        sample.completion_tokens = chunk.usage.completion_tokens
                sample.latency = time.perf_counter() - start
            except Exception as exc:             # noqa: BLE001 - every failure is a sample
                sample.error = f"{type(exc).__name__}: {exc}"[:300]
            with lock:
                samples.append(sample)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True)
               for i in range(config.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    return sorted(samples, key=lambda s: s.start)


def summarize(samples: list[Sample]) -> dict:
    ok = [s for s in samples if s.error is None]
    if not samples:
        raise FeatherError("no request was sent")
    wall = max(s.start + (s.latency or 0) for s in samples) - min(s.start for s in samples)
    latency = np.array([s.latency for s in ok])
    ttft = np.array([s.ttft for s in ok if s.ttft is not None])
    tokens = sum(s.completion_tokens or 0 for s in ok)

    def pct(values):
        return ({f"p{p}": float(np.percentile(values, p)) for p in (50, 95, 99)}
                if len(values) else {})

    return {"requests": len(samples), "ok": len(ok), "errors": len(samples) - len(ok),
            "error_examples": sorted({s.error for s in samples if s.error})[:5],
            "wall_s": wall, "throughput_rps": len(ok) / wall if wall else 0.0,
            "completion_tokens_per_s": tokens / wall if wall else 0.0,
            "latency_s": pct(latency), "ttft_s": pct(ttft)}


def samples_json(samples: list[Sample]) -> list[dict]:
    return [asdict(s) for s in samples]
