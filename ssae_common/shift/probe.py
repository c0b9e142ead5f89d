"""The linear probes of SHIFT: pooled activations, logistic regression (sklearn L2 or as Marks et al.) and
the accuracies a probe is judged by on the cells."""
from __future__ import annotations

import logging
import math

import numpy as np

from ..core.errors import BadInput
from .bios import Cells

log = logging.getLogger("ssae")


# ---------------------------------------------------------------------------------------- activations

def pooled(acts: list) -> np.ndarray:
    return np.stack([a.mean(0).numpy() for a in acts]).astype(np.float64)


# ------------------------------------------------------------------------------------------------ probe

MARKS_LR = 1e-3
MARKS_STEPS = 100


class LinearProbe:
    """Logistic regression on standardised features, stored as one weight vector and bias on raw inputs."""

    def __init__(self, weight: np.ndarray, bias: float):
        self.weight = np.asarray(weight, dtype=np.float64)
        self.bias = float(bias)

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, c: float = 1.0, seed: int = 0, kind: str = "l2") -> "LinearProbe":
        """kind "l2": sklearn L2 logistic regression (inverse strength `c`) on standardised features.
        kind "marks": as Marks et al. train their SHIFT classifier, a bare linear layer on the raw pooled
        activations, binary cross-entropy, Adam, no regularisation, full batch (see `fit_marks`)."""
        if len(np.unique(y)) < 2:
            raise BadInput("a probe's training set has only one class")
        if kind == "marks":
            return cls.fit_marks(x, y, seed)
        from sklearn.linear_model import LogisticRegression

        mean = x.mean(0)
        scale = x.std(0)
        scale[scale < 1e-8] = 1.0
        model = LogisticRegression(C=c, max_iter=5000, random_state=seed)
        model.fit((x - mean) / scale, y)
        w = model.coef_[0] / scale
        return cls(w, float(model.intercept_[0] - (w * mean).sum()))

    @classmethod
    def fit_marks(cls, x: np.ndarray, y: np.ndarray, seed: int = 0) -> "LinearProbe":
        """Unregularised logistic regression by Adam (lr MARKS_LR, MARKS_STEPS full-batch steps) from a
        seeded nn.Linear initialisation. Early-stopped gradient descent from near zero follows the
        strongest direction that separates the training labels first, which is what makes such a probe
        lean on a spurious feature (gender) that separates the ambiguous set as well as profession does."""
        import torch

        generator = torch.Generator().manual_seed(seed)
        xt = torch.tensor(x, dtype=torch.float32)
        yt = torch.tensor(y, dtype=torch.float32)
        bound = 1.0 / math.sqrt(x.shape[1])  # nn.Linear's default initialisation
        w = ((torch.rand(x.shape[1], generator=generator) * 2 - 1) * bound).requires_grad_(True)
        b = ((torch.rand(1, generator=generator) * 2 - 1) * bound).requires_grad_(True)
        optimiser = torch.optim.Adam([w, b], lr=MARKS_LR)
        for _ in range(MARKS_STEPS):
            optimiser.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt)
            loss.backward()
            optimiser.step()
        return cls(w.detach().double().numpy(), float(b.detach()[0]))

    def logit(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight + self.bias

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (self.logit(x) > 0).astype(np.int64)

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float((self.predict(x) == y).mean())


def probe_accuracies(probe: LinearProbe, x: np.ndarray, cells: Cells, idx: list[int]) -> dict:
    y = cells.label[idx]
    g = cells.gender[idx]
    pred = probe.predict(x)
    gender_of_class = np.array([1 if cells.genders[0] == "female" else 0, 1 if cells.genders[1] == "female" else 0])
    groups = {}
    for label in (0, 1):
        for gender in (1, 0):
            mask = (y == label) & (g == gender)
            groups[cells.cell_name(label, gender)] = float((pred[mask] == label).mean())
    return {"profession_accuracy": float((pred == y).mean()),
            "gender_accuracy": float((gender_of_class[pred] == g).mean()),
            "worst_group_accuracy": min(groups.values()),
            "group_accuracy": groups,
            "n": int(len(idx))}
