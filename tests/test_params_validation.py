"""Fitted parameters, targets and reference files are checked when built and when read back.

A reference JSON that is not an object, or holds values no fit makes (wrong shapes, out-of-range or
non-finite numbers, unknown names), is refused by :func:`load_reference_json` with an
:class:`InvalidReferenceError` naming the file and the entry; every value a fit makes still passes.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import zlib

import numpy as np
import pytest

from vipsnorm.errors import InvalidReferenceError
from vipsnorm.methods import (
    Clahe,
    ClaheParams,
    Equalize,
    EqualizeParams,
    Macenko,
    MacenkoParams,
    MacenkoTarget,
    Match,
    Reinhard,
    ReinhardTarget,
    Sample,
    Stretch,
    StretchParams,
    Vahadane,
    params_from_dict,
)
from vipsnorm.methods._stain import HE_REF
from vipsnorm.reference import Reference, load_reference_json, save_reference


def _tile(n: int = 96, seed: int = 0) -> np.ndarray:
    """An ``n x n`` H&E-like tile: two stains (Beer-Lambert, Io = 240) on some glass."""
    rng = np.random.default_rng(seed)
    c = np.zeros((n * n, 2))
    is_h = rng.random(n * n) < 0.5
    c[is_h, 0] = rng.gamma(4, 0.3, is_h.sum())
    c[~is_h, 1] = rng.gamma(4, 0.25, (~is_h).sum())
    c[:, 1] += rng.gamma(2, 0.05, n * n)
    c[rng.random(n * n) < 0.2] = 0
    od = c @ np.asarray(HE_REF).T
    pixels = 240 * np.exp(-od) - 1 + rng.normal(0, 1, od.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8).reshape(n, n, 3)


@pytest.fixture(scope="module")
def sample() -> Sample:
    return Sample.from_array(_tile())


@pytest.fixture(scope="module")
def references(sample) -> dict[str, dict]:
    """One reference dict (as ``vipsnorm fit`` writes it) of each kind and method."""
    tile = _tile()
    out = {
        "stretch": Reference(params=Stretch().fit(sample)),
        "stretch-rgb": Reference(params=Stretch(mode="rgb").fit(sample)),
        "equalize": Reference(params=Equalize().fit(sample)),
        "equalize-rgb": Reference(params=Equalize(mode="rgb").fit(sample)),
        "match-params": Reference(params=Match(sample).fit(Sample.from_array(_tile(seed=1)))),
        "match": Reference(target=Match().fit_target([sample]), method="match"),
        "macenko": Reference(target=Macenko().fit_target([sample]), method="macenko"),
        "macenko-params": Reference(params=Macenko().fit(sample)),
        "vahadane-params": Reference(params=Vahadane().fit(sample)),
        "reinhard": Reference(target=Reinhard().fit_target([sample]), method="reinhard"),
        "reinhard-params": Reference(params=Reinhard(Reinhard().fit_target([sample])).fit(sample)),
        "clahe": Reference(params=Clahe(grid=(4, 3)).fit_array(tile)),
        "clahe-rgb": Reference(params=Clahe(grid=(2, 2), mode="rgb").fit_array(tile)),
    }
    return {name: json.loads(json.dumps(ref.to_dict())) for name, ref in out.items()}


def _load(tmp_path, data, name: str = "ref.json") -> Reference:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return load_reference_json(path)


def _refused(tmp_path, data, *fragments: str) -> str:
    """Load ``data`` and return the message of the InvalidReferenceError, which names the file."""
    with pytest.raises(InvalidReferenceError) as info:
        _load(tmp_path, data, "tampered.json")
    message = str(info.value)
    assert message.startswith(str(tmp_path / "tampered.json") + ": not a vipsnorm reference ("), message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- defect 1: valid JSON that is not an object ----------------------------------------------------


@pytest.mark.parametrize("text", ["[1, 2]", '"x"', "3", "null", "true", "2.5"])
def test_json_that_is_not_an_object_is_refused(tmp_path, text):
    _refused(tmp_path, text, "the file holds", "not an object")


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"kind": "params", "params": [1, 2]}, "must be a JSON object"),
        ({"kind": "params", "params": "stretch"}, "must be a JSON object"),
        ({"kind": "params", "params": {"method": ["stretch"]}}, "unknown method"),
        ({"kind": "params", "params": {"space": "joint"}}, "unknown method None"),
        ({"kind": "target", "method": "macenko", "target": [1]}, "macenko-target parameters must be a JSON object"),
        ({"kind": "target", "method": "reinhard", "target": "x"}, "must be a JSON object"),
        ({"kind": "target", "method": "match", "sample": [1]}, "a sample must be a JSON object"),
        ({"kind": "target", "method": ["match"], "sample": {}}, "unknown method"),
        ({"kind": "target", "method": "stretch", "target": {}}, "maps onto no target"),
        ({"kind": "target", "method": "match"}, "no 'sample' entry"),
        ({"kind": "target", "method": "macenko"}, "no 'target' entry"),
        ({"kind": "params"}, "no 'params' entry"),
        ({"params": {}}, "no 'kind' entry"),
        ({"kind": ["params"]}, "unknown kind"),
        ({"kind": "params", "params": {"method": "stretch"}, "inputs": "a.svs"}, "'inputs' must be a list"),
        ({"kind": "params", "params": {"method": "stretch"}, "inputs": [1]}, "'inputs' must be a list"),
    ],
)
def test_malformed_structure_is_refused(tmp_path, data, fragment):
    _refused(tmp_path, data, fragment)


def test_json_nested_too_deeply_is_refused(tmp_path):
    # deeper than json can parse: its RecursionError is the file's error, not an internal one
    _refused(tmp_path, "[" * 100_000 + "]" * 100_000, "nested too deeply", "write references with 'vipsnorm fit'")


def test_a_sample_under_another_method_is_refused(tmp_path, references):
    data = dict(references["match"], method="macenko")
    _refused(tmp_path, data, "'sample' (histograms) is a match target")


def test_a_target_of_another_kind_is_refused(tmp_path, references):
    data = dict(references["macenko"], target=dict(references["macenko"]["target"], method="reinhard-target"))
    _refused(tmp_path, data, "expected macenko-target parameters")


# --- every fitted value still passes -----------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["stretch", "stretch-rgb", "equalize", "equalize-rgb", "match-params", "match", "macenko", "macenko-params",
     "vahadane-params", "reinhard", "reinhard-params", "clahe", "clahe-rgb"],
)
def test_fitted_references_load_unchanged(tmp_path, references, name):
    data = references[name]
    loaded = _load(tmp_path, data)
    assert json.loads(json.dumps(loaded.to_dict())) == data


def test_canonical_target_and_stain_jitter_shapes_pass():
    MacenkoTarget().validate()  # the default (canonical) target
    w = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.0, -0.03, 0.04]])  # H, E and a short residual
    w[:2] /= np.linalg.norm(w[:2], axis=1, keepdims=True)
    p = MacenkoParams(he=tuple(map(tuple, w)), max_c=(1.5, 1.0, 1.0), target_he=tuple(map(tuple, w)), target_max_c=(2.0, 1.0, 1.0))
    p.validate()
    assert p.od_matrix().shape == (3, 3)


def test_stain_vectors_with_negative_components_pass():
    # Macenko's fit makes such unit vectors on colours other than H&E; its apply step maps them as always
    he = ((0.924, -0.291, 0.248), (0.474, 0.707, -0.525))
    target = MacenkoTarget(he=he, max_c=(1.8, 1.66)).validate()
    assert target.he == he


def test_sample_with_uncounted_luma_passes(tmp_path, references):
    data = copy.deepcopy(references["match"])
    data["sample"]["hist"][3] = [float("nan")] * 256
    loaded = _load(tmp_path, data)
    assert not loaded.target.luma_counted


def test_stretch_equal_lo_hi_is_a_flat_channel(tmp_path, references):
    data = copy.deepcopy(references["stretch"])
    data["params"]["lo"] = data["params"]["hi"] = [100.0]
    params = _load(tmp_path, data).params
    np.testing.assert_array_equal(params.luts()[0], np.arange(256))  # left unchanged


# --- defect 2: values no fit makes ----------------------------------------------------------------

NAN = float("nan")

TAMPERED = [
    # (reference, where the value goes, value, fragments of the message)
    ("stretch", ("params", "lo"), [300.0], ["stretch parameter 'lo'", "in 0..255", "got 300"]),
    ("stretch", ("params", "lo"), [10.0, 20.0, 30.0], ["'lo' must be 1 row for space 'joint'"]),
    ("stretch", ("params", "lo"), [[1.0]], ["'lo'", "shape (1, 1)"]),
    ("stretch", ("params", "lo"), ["30"], ["'lo'", "got ['30']"]),
    ("stretch", ("params", "hi"), [10.0], ["'hi' must be at least 'lo'", "equal: a flat channel"]),
    ("stretch", ("params", "lo"), [NAN], ["'lo' holds a value that is not a finite number"]),
    ("stretch", ("params", "high"), 1.0, ["'high' must be a percentile in 0..100 above 'low'"]),
    ("stretch", ("params", "space"), "luminance", ["'space' must be one of 'joint', 'rgb'"]),
    ("stretch-rgb", ("params", "hi"), [200.0], ["'hi' must be 3 rows for space 'rgb'"]),
    ("equalize", ("params", "lut"), [list(range(10))], ["equalize parameter 'lut'", "256 integers", "shape (1, 10)"]),
    ("equalize", ("params", "lut"), [list(range(1, 257))], ["'lut'", "got 256 (need <= 255)"]),
    ("equalize", ("params", "lut"), [[float(v) for v in range(256)]], ["'lut'", "non-integers"]),
    ("equalize", ("params", "lut"), [list(range(256))] * 3, ["'lut' must be 1 row for space 'luminance'"]),
    ("equalize", ("params", "lut"), [], ["'lut'", "shape (0,)"]),
    ("equalize", ("params", "lut"), [list(range(256)), [0]], ["'lut'"]),  # ragged
    ("equalize", ("params", "space"), "joint", ["'space' must be one of 'luminance', 'rgb'"]),
    ("equalize-rgb", ("params", "lut"), [list(range(256))], ["'lut' must be 3 rows for space 'rgb'"]),
    ("match-params", ("params", "lut"), [[-1] + list(range(255))] * 3, ["match parameter 'lut'", "got -1"]),
    ("match-params", ("params", "target"), 3, ["'target' must be a string"]),
    ("macenko", ("target", "max_c"), [0, 0], ["macenko-target parameter 'max_c'", "> 0", "got 0"]),
    ("macenko", ("target", "max_c"), [1.0], ["'max_c' must be 2 numbers > 0", "shape (1,)"]),
    ("macenko", ("target", "he"), [[1, 2]], ["macenko-target parameter 'he'", "2 stain vectors", "shape (1, 2)"]),
    ("macenko", ("target", "he"), [[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]], ["'he'", "unit length", "lengths [2.0, 2.0]"]),
    ("macenko", ("target", "he"), [[0.0, 0.0, 0.0], [0.6, 0.8, 0.0]], ["'he'", "lengths [0.0, 1.0]"]),
    ("macenko", ("target", "he"), [[0.6, 0.8, 0.0], [0.0, 0.6, 0.8], [0.6, 0.0, 0.8]], ["'he'", "shape (3, 3)"]),
    ("macenko", ("target", "source"), None, ["'source' must be a string"]),
    ("macenko-params", ("params", "he"), [[0.6, 0.8, 0.0], [0.6, 0.8, 0.0]], ["'he'", "degree apart", "0.00 degrees"]),
    ("macenko-params", ("params", "max_c"), [1.0, -1.0], ["macenko parameter 'max_c'", "got -1"]),
    ("macenko-params", ("params", "target_max_c"), [1.0, 0.0], ["'target_max_c'"]),
    ("macenko-params", ("params", "target_he"), [[0.6, 0.8, 0.0]], ["'target_he' must be 2 stain vectors"]),
    ("macenko-params", ("params", "io"), 0, ["'io' must be a number > 0"]),
    ("macenko-params", ("params", "alpha"), 50.0, ["'alpha'", "need < 50"]),
    ("macenko-params", ("params", "stained"), 1.5, ["'stained'", "non-integers"]),
    ("macenko-params", ("params", "max_c"), [float("inf"), 1.0], ["'max_c' holds a value that is not a finite number"]),
    ("vahadane-params", ("params", "regularizer"), 0.0, ["vahadane parameter 'regularizer'"]),
    ("vahadane-params", ("params", "max_c"), [0, 0], ["vahadane parameter 'max_c'"]),
    ("reinhard", ("target", "std"), [1.0, -2.0, 3.0], ["reinhard-target parameter 'std'", "got -2"]),
    ("reinhard", ("target", "mean"), [50.0, 0.0], ["'mean' must be 3 numbers", "shape (2,)"]),
    ("reinhard-params", ("params", "target_std"), [1.0, 2.0, -3.0], ["reinhard parameter 'target_std'"]),
    ("reinhard-params", ("params", "glass"), [200.0, 100.0], ["'glass'", "low < high", "got (200, 100)"]),
    ("reinhard-params", ("params", "glass"), [100.0], ["'glass'", "shape (1,)"]),
    ("clahe", ("params", "grid"), [0, 3], ["clahe parameter 'grid'", "got 0 (need >= 1)"]),
    ("clahe", ("params", "grid"), [4, 3, 1], ["'grid'", "shape (3,)"]),
    ("clahe", ("params", "tile"), [7, 7], ["'tile' must be (24, 32), the regions of a 4x3 grid on 96x96 pixels"]),
    ("clahe", ("params", "width"), 0, ["'width' must be a positive integer"]),
    ("clahe", ("params", "height"), 96.0, ["'height'", "non-integers"]),
    ("clahe", ("params", "clip_limit"), -1.0, ["'clip_limit'", "got -1"]),
    ("clahe", ("params", "mode"), "hsv", ["'mode' must be one of 'luminance', 'rgb', 'grey'"]),
    ("clahe", ("params", "luts"), "not base64!", ["'luts'", "undecodable"]),
    ("clahe", ("params", "luts"), base64.b64encode(b"not zlib").decode(), ["'luts'", "undecodable"]),
    ("clahe", ("params", "luts"), base64.b64encode(zlib.compress(bytes(256))).decode(), ["'luts'", "(3072 bytes)", "got 256 bytes"]),
    ("clahe", ("params", "luts"), base64.b64encode(zlib.compress(bytes(10**6))).decode(), ["'luts'", "got more than 3072 bytes"]),
    ("clahe", ("params", "luts"), 5, ["'luts'", "got 'int'"]),
    ("clahe-rgb", ("params", "luts"), ClaheParams.encode_luts(np.zeros((1, 2, 2, 256))), ["'luts'", "3x2x2x256"]),
]


@pytest.mark.parametrize("name, where, value, fragments", TAMPERED, ids=[f"{t[0]}-{t[1][1]}-{i}" for i, t in enumerate(TAMPERED)])
def test_tampered_values_are_refused_naming_file_and_entry(tmp_path, references, name, where, value, fragments):
    data = copy.deepcopy(references[name])
    data[where[0]][where[1]] = value
    _refused(tmp_path, data, *fragments, "write references with 'vipsnorm fit'")


def test_unknown_field_is_refused(tmp_path, references):
    data = copy.deepcopy(references["stretch"])
    data["params"]["gamma"] = 1.0
    _refused(tmp_path, data, "unknown stretch parameters: ['gamma']")


SAMPLE_TAMPERED = [
    ("hist", lambda h: h[:3], ["sample 'hist' must be 4 rows", "shape (3, 256)"]),
    ("hist", lambda h: [row[:10] for row in h], ["sample 'hist'", "shape (4, 10)"]),
    ("hist", lambda h: [[-1.0] + row[1:] if i == 0 else row for i, row in enumerate(h)], ["sample 'hist'", "got -1"]),
    ("hist", lambda h: [[NAN] + row[1:] if i == 1 else row for i, row in enumerate(h)], ["not a finite number", "only the luma row"]),
    ("hist", lambda h: h[:3] + [[NAN] * 255 + [1.0]], ["not a finite number"]),
    ("hist", lambda h: [[0.0] * 256 if i == 2 else row for i, row in enumerate(h)], ["row(s) B hold none"]),
    ("hist", lambda h: "hist", ["sample 'hist'"]),
    ("bands", lambda b: 2, ["sample 'bands' must be 1 (grey) or 3 (colour), not 2"]),
    ("bands", lambda b: "3", ["sample 'bands'"]),
    ("background", lambda b: [230.0] * 5, ["sample 'background'", "shape (5,)"]),
    ("background", lambda b: [230.0, 230.0, 300.0, 230.0], ["sample 'background'", "got 300"]),
    ("background", lambda b: [230.0, NAN, 230.0, 230.0], ["sample 'background' holds a value that is not a finite number"]),
    ("source", lambda s: 7, ["sample 'source' must be a string"]),
]


@pytest.mark.parametrize("key, change, fragments", SAMPLE_TAMPERED, ids=[f"{t[0]}-{i}" for i, t in enumerate(SAMPLE_TAMPERED)])
def test_tampered_sample_is_refused(tmp_path, references, key, change, fragments):
    data = copy.deepcopy(references["match"])
    data["sample"][key] = change(data["sample"].get(key))
    _refused(tmp_path, data, *fragments)


def test_missing_sample_entry_is_refused(tmp_path, references):
    data = copy.deepcopy(references["match"])
    del data["sample"]["hist"]
    _refused(tmp_path, data, "no 'hist' entry")


# --- the same checks in code ---------------------------------------------------------------------


def test_params_built_in_code_are_checked_by_validate(sample):
    # not on construction (fits and per-patch augmentations build many): validate() on hand-made ones
    with pytest.raises(ValueError, match=r"equalize parameter 'lut' must be 1 or 3 rows .*shape \(1, 10\)"):
        EqualizeParams(space="luminance", lut=(tuple(range(10)),)).validate()
    with pytest.raises(ValueError, match="macenko-target parameter 'max_c'"):
        MacenkoTarget(max_c=(0.0, 0.0)).validate()
    with pytest.raises(ValueError, match="reinhard-target parameter 'std'"):
        ReinhardTarget(mean=(50.0, 0.0, 0.0), std=(1.0, -1.0, 1.0)).validate()
    params = Stretch().fit(sample)
    assert params.validate() is params
    with pytest.raises(ValueError, match="'hi' must be at least 'lo'"):
        dataclasses.replace(params, lo=(200.0,), hi=(100.0,)).validate()
    clahe = Clahe(grid=(2, 2)).fit_array(_tile())
    assert clahe.validate() is clahe
    with pytest.raises(ValueError, match="clahe parameter 'tile'"):
        dataclasses.replace(clahe, tile=(1, 1)).validate()


def test_non_finite_values_are_left_to_is_finite(sample):
    # a fit that produced a NaN builds, and save_reference refuses it with its own message
    params = Stretch().fit(sample)
    bad = dataclasses.replace(params, lo=(float("nan"),))
    assert not bad.is_finite()
    target = dataclasses.replace(Macenko().fit_target([sample]), max_c=(float("nan"), 1.0))
    assert not target.is_finite()


def test_save_then_load_round_trip_keeps_checked_values(tmp_path, sample):
    for reference in (Reference(params=Stretch().fit(sample)), Reference(target=sample, method="match")):
        path = save_reference(reference, tmp_path / "r.json")
        again = load_reference_json(path)
        assert again.to_dict() == json.loads(json.dumps(reference.to_dict()))


def test_params_from_dict_refuses_what_is_not_an_object():
    with pytest.raises(ValueError, match="parameters must be a JSON object with a 'method', not a JSON array"):
        params_from_dict([1, 2])
    with pytest.raises(ValueError, match="expected stretch parameters, not 'equalize'"):
        StretchParams.from_dict({"method": "equalize", "space": "joint"})
