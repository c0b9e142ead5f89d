"""The optimiser and the schedules: Adam; linear learning-rate warm-up, constant, linear decay to 0 over the
last `decay_fraction`; L1 coefficient warm-up."""
from __future__ import annotations

import math

import torch

from .config import FitConfig


class Adam:
    """Adam (Kingma & Ba) over a few parameters.  Plain tensor ops: no torch.optim machinery (whose
    first step imports the compiler stack, seconds of start-up), and a state that is easy to save."""

    def __init__(self, params, betas=(0.9, 0.999), eps=1e-8):
        self.params = list(params)
        self.betas, self.eps = betas, eps
        self.t = 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            # lr * (m / c1) / (sqrt(v / c2) + eps), with one pass fewer over the weights
            denom = v.sqrt().add_(self.eps * math.sqrt(c2))
            p.addcdiv_(m, denom, value=-lr * math.sqrt(c2) / c1)

    def state_dict(self) -> dict:
        return {"t": self.t, "m": [m.cpu() for m in self.m], "v": [v.cpu() for v in self.v]}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
        for mine, saved in zip(self.m + self.v, state["m"] + state["v"]):
            mine.copy_(saved)


def lr_at(cfg: FitConfig, step: int) -> float:
    steps = cfg.steps
    warm = min(cfg.warmup_steps, steps // 10)
    if warm and step < warm:
        return cfg.lr * (step + 1) / warm
    decay_start = steps - int(steps * cfg.decay_fraction)
    if step >= decay_start and steps > decay_start:
        return cfg.lr * max(0.0, (steps - step) / (steps - decay_start))
    return cfg.lr


def l1_at(cfg: FitConfig, step: int) -> float:
    warm = int(cfg.steps * cfg.l1_warmup_fraction)
    return cfg.l1 * min(1.0, (step + 1) / warm) if warm else cfg.l1
