"""SHIFT on Bias in Bios: the method (method.py), its options (config.py) and the stage (stage.py)."""
from .config import ShiftConfig


def __getattr__(name):
    if name in ("shift", "shift_artifact"):
        from . import stage

        return getattr(stage, name)
    raise AttributeError(name)


__all__ = ["ShiftConfig", "shift", "shift_artifact"]
