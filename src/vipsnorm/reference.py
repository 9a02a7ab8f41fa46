"""References saved as JSON: a target that every image is mapped onto, or a method's fitted parameters.

``{"vipsnorm": "0.1.0", "kind": "target", "method": "match", "sample": {...}, "inputs": [...]}``
    What ``match`` maps every image onto: the tissue histograms of one image, or pooled over a set.
``{"vipsnorm": "0.1.0", "kind": "target", "method": "macenko", "target": {...}, "inputs": [...]}``
    A stain method's target (stain vectors and concentrations, or Lab statistics) from one image or
    aggregated over a set; each image is fitted on its own and mapped onto it.
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
from .methods import METHODS, Params, Sample, params_from_dict
from .methods.base import _json_kind, _shown

__all__ = ["Reference", "save_reference", "load_reference_json"]


@dataclass(frozen=True)
class Reference:
    """A loaded reference: exactly one of ``target`` and ``params`` is set.

    ``target`` is what method ``method`` maps images onto: a :class:`Sample` palette for ``match``, the
    method's ``target_type`` for the stain methods.
    """

    target: object | None = None
    params: Params | None = None
    inputs: tuple[str, ...] = field(default=())
    method: str = "match"

    def __post_init__(self):
        if (self.target is None) == (self.params is None):
            raise ValueError("a reference holds either a target or parameters")
        if self.params is not None:
            object.__setattr__(self, "method", self.params.method)

    @property
    def kind(self) -> str:
        return "target" if self.target is not None else "params"

    def to_dict(self) -> dict:
        if self.params is not None:
            body = {"params": self.params.to_dict()}
        elif isinstance(self.target, Sample):
            body = {"method": self.method, "sample": self.target.to_dict()}
        else:
            body = {"method": self.method, "target": self.target.to_dict()}
        return {"vipsnorm": __version__, "kind": self.kind, **body, "inputs": list(self.inputs)}


def save_reference(reference: Reference, path: str | os.PathLike[str]) -> Path:
    """Write ``reference`` as JSON (atomically)."""
    path = Path(path)
    saved = reference.params if reference.params is not None else reference.target
    if isinstance(saved, Params) and not saved.is_finite():  # never a reference every later apply fails on
        raise InvalidReferenceError(path, "the fitted reference holds values that are not finite numbers (NaN or infinity); not written")
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(reference.to_dict(), indent=1) + "\n")
    return path


def load_reference_json(path: str | os.PathLike[str]) -> Reference:
    """Read a reference written by :func:`save_reference` (``vipsnorm fit``).

    Raises
    ------
    InvalidReferenceError
        Naming the file: it cannot be read, is not JSON (or is nested too deeply), or is not a reference
        (not a JSON object, an unknown kind or method, a missing entry, or values no fit makes: wrong
        shapes, out of range, NaN or infinity; the message names the entry).
    """
    try:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"the file holds {_json_kind(data)}, not an object")
        inputs = data.get("inputs", [])
        if not isinstance(inputs, list) or not all(isinstance(name, str) for name in inputs):
            raise ValueError(f"'inputs' must be a list of file names, not {_shown(inputs)}")
        inputs = tuple(inputs)
        kind = data["kind"]
        if kind == "target":
            method = data.get("method", "match")
            if not isinstance(method, str) or method not in METHODS:
                raise ValueError(f"unknown method {_shown(method)}; known: {sorted(METHODS)}")
            target_type = METHODS[method].target_type
            if target_type is None:
                raise ValueError(f"method {method!r} maps onto no target")
            if "sample" in data and target_type is not Sample:
                raise ValueError(f"a 'sample' (histograms) is a match target, not a {method} one")
            body = data["sample"] if target_type is Sample else data["target"]
            return Reference(target=target_type.from_dict(body), inputs=inputs, method=method)
        if kind == "params":
            return Reference(params=params_from_dict(data["params"]), inputs=inputs)
        raise ValueError(f"unknown kind {_shown(kind)} (a reference is a 'target' or 'params')")
    except KeyError as exc:
        raise InvalidReferenceError(path, f"not a vipsnorm reference (no {exc.args[0]!r} entry){_REFIT}") from exc
    except OSError as exc:
        raise InvalidReferenceError(path, f"not a vipsnorm reference ({exc})") from exc
    except (ValueError, TypeError) as exc:
        raise InvalidReferenceError(path, f"not a vipsnorm reference ({exc}){_REFIT}") from exc
    except RecursionError as exc:  # nested deeper than json (or the checks) can recurse; no reference is
        raise InvalidReferenceError(path, f"not a vipsnorm reference (JSON nested too deeply){_REFIT}") from exc


#: The fix for a reference that is not one (a hand-written or edited file), after its cause.
_REFIT = "; write references with 'vipsnorm fit'"
