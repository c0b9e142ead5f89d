"""Sparse autoencoders in the `ssae.sae/1` directory format (docs/formats.md).

    pre   = ((x * act_scale) - b_dec) @ W_enc + b_enc
    f     = act(pre)
    x_hat = (f @ W_dec + b_dec) / act_scale

`act` is ReLU; for `topk` the k largest pre-activations (after ReLU) of each row; for `jumprelu` and
`batchtopk`, ReLU(pre) where pre > threshold (a tensor [d_sae]), else 0.  A BatchTopK SAE keeps the k
largest of the whole batch while it trains and uses its threshold at inference, as dictionary_learning
and SAELens do.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..core.config import ConfigError
from ..core.errors import BadInput
from ..core.records import dump_json

SCHEMA = "ssae.sae/1"
ARCHITECTURES = ("relu", "topk", "jumprelu", "batchtopk")
THRESHOLDED = ("jumprelu", "batchtopk")  # architectures with a `threshold` tensor
WEIGHTS = "sae.safetensors"
CONFIG = "cfg.json"


class SAE(nn.Module):
    def __init__(self, d_in: int, d_sae: int, architecture: str = "relu", k: int | None = None,
                 act_scale: float = 1.0):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ConfigError("architecture", architecture, f"expected one of {', '.join(ARCHITECTURES)}")
        if architecture in ("topk", "batchtopk") and (k is None or not 0 < k <= d_sae):
            raise ConfigError("k", k, f"must be between 1 and d_sae ({d_sae}) for a {architecture} SAE")
        self.d_in, self.d_sae, self.architecture, self.k = d_in, d_sae, architecture, k
        self.act_scale = float(act_scale)
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if architecture == "jumprelu":  # trained (straight-through estimator, objective.py)
            self.threshold = nn.Parameter(torch.zeros(d_sae))
        elif architecture == "batchtopk":  # a running estimate, not a gradient parameter
            self.register_buffer("threshold", torch.zeros(d_sae))
        self.cfg: dict = {}

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.act_scale - self.b_dec) @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        f = torch.relu(pre)
        if self.architecture in THRESHOLDED:
            return f * (pre > self.threshold)
        if self.architecture == "topk":
            values, index = f.topk(self.k, dim=-1)
            f = torch.zeros_like(f).scatter(-1, index, values)
        return f

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.pre_acts(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return (f @ self.W_dec + self.b_dec) / self.act_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @property
    def model(self) -> str:
        return self.cfg.get("model", "")

    @property
    def hook(self) -> str:
        return self.cfg.get("hook", "")

    def config(self, **extra) -> dict:
        cfg = {**self.cfg, "schema": SCHEMA, "architecture": self.architecture, "d_in": self.d_in,
               "d_sae": self.d_sae, "k": self.k, "act_scale": self.act_scale}
        cfg.setdefault("l1_coefficient", 0.0)
        cfg.setdefault("tilt", 0.0)
        cfg.setdefault("parent", None)
        cfg.update(extra)
        return cfg

    def save(self, folder: str, **extra) -> None:
        """Write sae.safetensors and cfg.json into an existing folder (use outputs.atomic_dir)."""
        from safetensors.torch import save_file

        tensors = {name: p.detach().float().cpu().contiguous() for name, p in self.state_dict().items()}
        save_file(tensors, os.path.join(folder, WEIGHTS))
        with open(os.path.join(folder, CONFIG), "w") as f:
            dump_json(self.config(**extra), f, indent=2)

    @classmethod
    def load(cls, folder: str, device: str = "cpu") -> "SAE":
        cfg = read_config(folder)
        from safetensors.torch import load_file

        weights = os.path.join(folder, WEIGHTS)
        if not os.path.exists(weights):
            raise BadInput(f"{folder}: no {WEIGHTS}")
        try:
            tensors = load_file(weights)
        except Exception as e:  # safetensors raises its own error type for a truncated or foreign file
            raise BadInput(f"{weights}: not a readable safetensors file ({e})") from None
        try:
            sae = cls(int(cfg["d_in"]), int(cfg["d_sae"]), cfg.get("architecture", "relu"), cfg.get("k"),
                      float(cfg.get("act_scale", 1.0)))
        except KeyError as e:
            raise BadInput(f"{folder}/{CONFIG}: missing field {e.args[0]!r}") from None
        for name in tensor_names(sae.architecture):
            if name not in tensors:
                raise BadInput(f"{weights}: missing tensor {name}")
            expected = tuple(getattr(sae, name).shape)
            if tuple(tensors[name].shape) != expected:
                raise BadInput(f"{weights}: {name} has shape {tuple(tensors[name].shape)}, cfg.json implies {expected}")
            getattr(sae, name).data.copy_(tensors[name].float())
        sae.cfg = cfg
        return sae.to(device)


def tensor_names(architecture: str) -> tuple[str, ...]:
    return ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if architecture in THRESHOLDED else ())


def read_config(folder: str) -> dict:
    if not os.path.isdir(folder):
        raise BadInput(f"{folder}: no such SAE directory")
    path = os.path.join(folder, CONFIG)
    if not os.path.exists(path):
        raise BadInput(f"{folder}: not an SAE directory (no {CONFIG})")
    return read_json_object(path)


def read_json_object(path: str) -> dict:
    """A JSON file holding one object; BadInput naming the file otherwise."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}: malformed JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path}: expected a JSON object")
    return data
