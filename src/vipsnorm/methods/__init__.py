"""Normalization methods: each a ``fit(sample) -> Params`` / ``apply(image, params)`` pair."""

from __future__ import annotations

from .base import LutMethod, LutParams, Method, Params, Sample, _json_kind
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
    """Rebuild fitted parameters saved with ``Params.to_dict()``.

    Raises
    ------
    ValueError
        ``data`` is not a dict, names no known method, or holds values the method's
        :meth:`Params.from_dict` refuses (the message names the field).
    """
    if not isinstance(data, dict):
        raise ValueError(f"parameters must be a JSON object with a 'method', not {_json_kind(data)}")
    name = data.get("method")
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name].params_type.from_dict(data)
