"""Normalization methods: each a ``fit(sample) -> Params`` / ``apply(image, params)`` pair."""

from __future__ import annotations

from .base import LutMethod, LutParams, Method, Params, Sample
from .clahe import Clahe, ClaheParams
from .equalize import Equalize, EqualizeParams
from .match import Match, MatchParams
from .stain import (
    Macenko,
    MacenkoParams,
    MacenkoTarget,
    Reinhard,
    ReinhardParams,
    ReinhardTarget,
    StainParams,
    Vahadane,
    VahadaneParams,
    stain_summary,
)
from .stretch import Stretch, StretchParams

__all__ = [
    "METHODS",
    "Method",
    "LutMethod",
    "Params",
    "LutParams",
    "Sample",
    "Stretch",
    "StretchParams",
    "Equalize",
    "EqualizeParams",
    "Match",
    "MatchParams",
    "Clahe",
    "ClaheParams",
    "Reinhard",
    "ReinhardParams",
    "ReinhardTarget",
    "Macenko",
    "MacenkoParams",
    "MacenkoTarget",
    "Vahadane",
    "VahadaneParams",
    "StainParams",
    "stain_summary",
    "params_from_dict",
]

#: The explicit name -> class table.
METHODS: dict[str, type[Method]] = {
    "stretch": Stretch,
    "equalize": Equalize,
    "match": Match,
    "clahe": Clahe,
    "reinhard": Reinhard,
    "macenko": Macenko,
    "vahadane": Vahadane,
}


def params_from_dict(data: dict) -> Params:
    """Rebuild fitted parameters saved with ``Params.to_dict()``."""
    try:
        method = METHODS[data["method"]]
    except KeyError as exc:
        raise ValueError(f"unknown method {data.get('method')!r}; known: {sorted(METHODS)}") from exc
    return method.params_type.from_dict(data)
