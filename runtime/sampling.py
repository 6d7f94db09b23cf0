"""Next-token choice: greedy by default, temperature / top-k / top-p sampling with a seed."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import FeatherError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0        # 0 = greedy
    top_k: int = 0                  # 0 = off
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise FeatherError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise FeatherError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise FeatherError(f"top_p must be in (0, 1], got {self.top_p}")


class Sampler:
    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float64).reshape(-1)
        cfg = self.config
        if cfg.temperature == 0:
            return int(np.argmax(logits))
        logits = logits / cfg.temperature
        if cfg.top_k:
            kth = np.sort(logits)[-min(cfg.top_k, logits.size)]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if cfg.top_p < 1:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            cut = order[np.searchsorted(cumulative, cfg.top_p) + 1:]
            probs[cut] = 0
            probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))
