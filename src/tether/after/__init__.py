"""After fine-tuning: see where the model changed (`diagnose`) and trade task gain against
forgetting by weight-space interpolation (`interpolate`, WiSE-FT).

Names are imported lazily so that importing ``tether.after`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "diagnose": "diagnose", "Diagnosis": "diagnose", "BlockDiagnosis": "diagnose", "linear_cka": "diagnose",
    "suggest": "diagnose", "interpolate": "interpolate", "InterpolationResult": "interpolate",
    "AlphaPoint": "interpolate", "select_alpha": "interpolate", "save_choice": "interpolate",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tether.after' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
