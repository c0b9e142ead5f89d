"""Sparse autoencoders in the `ssae.sae/1` directory format (docs/formats.md).

    pre   = ((x * act_scale) - b_dec) @ W_enc + b_enc
    f     = act(pre)
    x_hat = (f @ W_dec + b_dec) / act_scale

`act` and any tensors beyond these four (a `threshold`) are the architecture's (architectures/): ReLU; for
`topk` the k largest pre-activations (after ReLU) of each row; for `jumprelu`, `batchtopk` and
`matryoshka-batchtopk`, ReLU(pre) where pre > threshold (a tensor [d_sae]), else 0.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..core.config import ConfigError
from ..core.errors import BadInput
from ..core.records import dump_json
from . import architectures

SCHEMA = "ssae.sae/1"
WEIGHTS = "sae.safetensors"
CONFIG = "cfg.json"


class SAE(nn.Module):
    def __init__(self, d_in: int, d_sae: int, architecture: str = "relu", k: int | None = None,
                 act_scale: float = 1.0, group_sizes=None):
        super().__init__()
        if architecture not in architectures.NAMES:
            raise ConfigError("architecture", architecture, f"expected one of {', '.join(architectures.NAMES)}")
        self.d_in, self.d_sae, self.architecture, self.k = d_in, d_sae, architecture, k
        self.act_scale = float(act_scale)
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.group_sizes: tuple[int, ...] | None = None
        self.arch.build(self, group_sizes)
        self.cfg: dict = {}

    @property
    def arch(self):
        """The Architecture (architectures/) of this SAE."""
        return architectures.get(self.architecture)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.act_scale - self.b_dec) @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return self.arch.activation(self, pre)

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
               "d_sae": self.d_sae, "k": self.k, "act_scale": self.act_scale, **self.arch.cfg_fields(self)}
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
                      float(cfg.get("act_scale", 1.0)), cfg.get("group_sizes"))
        except KeyError as e:
            raise BadInput(f"{folder}/{CONFIG}: missing field {e.args[0]!r}") from None
        for name in sae.arch.tensor_names():
            if name not in tensors:
                raise BadInput(f"{weights}: missing tensor {name}")
            expected = tuple(getattr(sae, name).shape)
            if tuple(tensors[name].shape) != expected:
                raise BadInput(f"{weights}: {name} has shape {tuple(tensors[name].shape)}, cfg.json implies {expected}")
            getattr(sae, name).data.copy_(tensors[name].float())
        sae.cfg = cfg
        return sae.to(device)


def read_config(folder: str) -> dict:
    if not os.path.isdir(folder):
        raise BadInput(f"{folder}: no such SAE directory")
    path = os.path.join(folder, CONFIG)
    if not os.path.exists(path):
        raise BadInput(f"{folder}: not an SAE directory (no {CONFIG})")
    cfg = read_json_object(path)
    check_config_types(path, cfg)
    return cfg


def check_config_types(path: str, cfg: dict) -> None:
    """BadInput naming `path` and the field when a cfg.json field has the wrong type (d_sae "16")."""
    def integer(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    rules = {"d_in": (integer, "a positive integer"), "d_sae": (integer, "a positive integer"),
             "k": (lambda v: v is None or integer(v), "a positive integer or null"),
             "act_scale": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
             "architecture": (lambda v: isinstance(v, str), "a string")}
    for name, (ok, what) in rules.items():
        if name in cfg and not ok(cfg[name]):
            raise BadInput(f"{path}: {name} is {json.dumps(cfg[name])}, expected {what}")


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
