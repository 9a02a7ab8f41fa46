"""References saved as JSON: a target palette (pooled histograms) or a method's fitted parameters.

``{"vipsnorm": "0.1.0", "kind": "target", "sample": {...}, "inputs": [...]}``
    What ``match`` maps every image onto: the tissue histograms of one image, or pooled over a set.
``{"vipsnorm": "0.1.0", "kind": "params", "params": {"method": "stretch", ...}, "inputs": [...]}``
    Parameters fitted once (on one image or a whole set) and applied unchanged to every image.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import InvalidReferenceError
from .io.write import atomic_path
from .methods import Params, Sample, params_from_dict

__all__ = ["Reference", "save_reference", "load_reference_json"]


@dataclass(frozen=True)
class Reference:
    """A loaded reference: exactly one of ``target`` and ``params`` is set."""

    target: Sample | None = None
    params: Params | None = None
    inputs: tuple[str, ...] = field(default=())

    @property
    def kind(self) -> str:
        return "target" if self.target is not None else "params"

    def to_dict(self) -> dict:
        body = {"sample": self.target.to_dict()} if self.target is not None else {"params": self.params.to_dict()}
        return {"vipsnorm": __version__, "kind": self.kind, **body, "inputs": list(self.inputs)}


def save_reference(reference: Reference, path: str | os.PathLike[str]) -> Path:
    """Write ``reference`` as JSON (atomically)."""
    path = Path(path)
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(reference.to_dict(), indent=1) + "\n")
    return path


def load_reference_json(path: str | os.PathLike[str]) -> Reference:
    """Read a reference written by :func:`save_reference` (``vipsnorm fit``)."""
    try:
        data = json.loads(Path(path).read_text())
        inputs = tuple(data.get("inputs", ()))
        if data["kind"] == "target":
            return Reference(target=Sample.from_dict(data["sample"]), inputs=inputs)
        if data["kind"] == "params":
            return Reference(params=params_from_dict(data["params"]), inputs=inputs)
        raise ValueError(f"unknown kind {data['kind']!r}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidReferenceError(path, f"not a vipsnorm reference ({exc})") from exc
