"""A dataset fit keeps a few numbers per input, not its pixels: each method's ``summarize`` gives the
same target as its samples, and an input a method cannot use is an error while the others go on."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import pyvips

import vipsnorm
from vipsnorm.errors import InvalidReferenceError
from vipsnorm.engine import Options, fit_files, summarize_file
from vipsnorm.methods import Macenko, Match, Reinhard, Sample, Vahadane
from vipsnorm.methods.stain import SAMPLE_PIXELS, LabSummary, StainSummary

TILES = ("henorm-example1.png", "kather-template.jpg", "torchstain-target.png", "histolab-target.png")


def _sample(shared_data, name: str) -> Sample:
    image = pyvips.Image.new_from_file(str(shared_data / "tiles" / name))
    return Sample.from_array(image.flatten(background=255).cast("uchar").numpy() if image.bands == 4 else image.numpy())


@pytest.mark.parametrize("method", [Macenko(), Vahadane(), Reinhard(), Match(None)], ids=lambda m: m.name)
def test_summaries_give_the_target_of_the_samples(shared_data, method):
    samples = [_sample(shared_data, name) for name in TILES]
    summaries = [method.summarize(s) for s in samples]
    for n in (len(samples), 1):
        from_summaries, from_samples = method.fit_target(summaries[:n]), method.fit_target(samples[:n])
        if isinstance(method, Match):  # a palette: its pooled pixels are never used (nor saved)
            assert from_summaries.to_dict() == from_samples.to_dict()
            np.testing.assert_array_equal(from_summaries.hist, from_samples.hist)
        else:
            assert from_summaries == from_samples
    for summary, sample in zip(summaries, samples):
        size = len(pickle.dumps(summary))
        assert size < 12_000 < len(pickle.dumps(sample))  # what a worker sends back: no pixels
        if isinstance(summary, Sample):
            assert summary.pixels is None and np.array_equal(summary.hist, sample.hist)
    kinds = {Macenko: StainSummary, Vahadane: StainSummary, Reinhard: LabSummary, Match: Sample}
    assert all(isinstance(s, kinds[type(method)]) for s in summaries)


@pytest.mark.parametrize("cls", [Macenko, Vahadane, Reinhard], ids=lambda c: c.name)
def test_dataset_targets_are_the_medians_of_each_inputs_own_fit(shared_data, cls):
    # an independent path: each tile's own fit (its params hold its stains, or its CIELAB statistics)
    samples = [_sample(shared_data, name) for name in TILES]
    if cls is Reinhard:
        fitter = Reinhard(Reinhard().fit_target(samples[:1]))
        fits = [fitter.fit(s) for s in samples]
        expected = {"mean": np.median([f.mean for f in fits], axis=0), "std": np.median([f.std for f in fits], axis=0)}
    else:
        fits = [cls().fit(s) for s in samples]
        he = np.median([np.asarray(f.he) for f in fits], axis=0)
        expected = {"he": he / np.linalg.norm(he, axis=1, keepdims=True), "max_c": np.median([f.max_c for f in fits], axis=0)}
    target = cls().fit_target([cls().summarize(s) for s in samples])
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(getattr(target, name)), value, rtol=1e-12, atol=1e-12)


def _write(path, pixels: np.ndarray) -> str:
    pyvips.Image.new_from_array(pixels).copy(interpretation="srgb").pngsave(str(path))
    return str(path)


def test_an_input_a_stain_method_cannot_use_is_an_error_and_the_others_fit(shared_data, tmp_path):
    rng = np.random.default_rng(0)
    eosin = np.array([0.07, 0.99, 0.11]) / np.linalg.norm([0.07, 0.99, 0.11])
    one_stain = np.clip(240 * np.exp(-rng.gamma(2.0, 0.3, (128 * 128, 1)) * eosin), 0, 255)
    bad = _write(tmp_path / "eosin-only.png", one_stain.astype(np.uint8).reshape(128, 128, 3))
    good = [str(shared_data / "tiles" / name) for name in TILES[:2]]
    reference, results = fit_files([good[0], bad, good[1]], "macenko")
    assert [r.status for r in results] == ["ok", "error", "ok"]
    assert results[1].error.startswith(f"{bad}: ") and "stain" in results[1].error
    assert reference.inputs == tuple(good)
    alone, _ = fit_files(good, "macenko")
    assert reference.to_dict() == alone.to_dict()
    result, summary = summarize_file(bad, "macenko")
    assert result.status == "error" and summary is None
    with pytest.raises(InvalidReferenceError) as caught:  # nothing usable: say why, naming the file
        fit_files([bad], "macenko")
    assert str(caught.value).startswith("no input could be used; no reference written: " + bad + ": macenko: ")


def test_summarize_file_uses_the_method_options(shared_data):
    path = shared_data / "tiles" / TILES[0]
    _, default = summarize_file(path, "macenko")
    _, other = summarize_file(path, "macenko", Options(), {"beta": 0.3})
    assert isinstance(default, StainSummary) and not np.allclose(default.he, other.he)
    assert default.he.shape == (3, 2) and SAMPLE_PIXELS > default.stained > 0
    assert vipsnorm.build_method("macenko", beta=0.3).summarize(_sample(shared_data, TILES[0])).he == pytest.approx(other.he)
