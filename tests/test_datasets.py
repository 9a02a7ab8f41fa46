"""PyTorch and Keras datasets over (slide, coordinates): normalized patches and labels, lazy slides
per process (pickling, forked and spawned workers), reproducible augmentation; the examples run."""

from __future__ import annotations

import importlib.util
import math
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

import vipsnorm
from vipsnorm.engine import Options, build_method, fit_slide
from vipsnorm.training import augment as A
from vipsnorm.training.patches import plan_patches

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def keras():
    if "keras" not in sys.modules:
        os.environ.setdefault("KERAS_BACKEND", "torch")
    return pytest.importorskip("keras")


@pytest.fixture(scope="module")
def two_slides(small_slide, tmp_path_factory) -> list[Path]:
    from vipsnorm.synth import write_synthetic_slide

    other = write_synthetic_slide(tmp_path_factory.mktemp("lab2") / "pink.tif", 1024, 768, lab="dark-pink", seed=2)
    return [Path(small_slide), other]


@pytest.fixture(scope="module")
def patches(two_slides):
    return [p for s in two_slides for p in plan_patches(s, 96, random=6, seed=0, min_tissue=0.3)]


@pytest.fixture(scope="module")
def expected(two_slides, patches) -> dict:
    """Each patch normalized as the whole slide is (Macenko, the engine's fit), read with a plain crop."""
    method = build_method("macenko")
    out = {}
    for slide_path in two_slides:
        with vipsnorm.open(slide_path) as slide:
            params = fit_slide(slide, method, Options())
            level0 = method.apply(slide.level_image(0), params)
            for p in patches:
                if p.slide == str(slide_path):
                    out[p] = level0.crop(p.x, p.y, p.size, p.size).numpy()
    return out


def test_torch_dataset_items_are_the_normalized_windows(torch, patches, expected):
    from vipsnorm.training.datasets import PatchDataset

    slides = list(dict.fromkeys(p.slide for p in patches))
    ds = PatchDataset(patches, {s: i for i, s in enumerate(slides)}, method="macenko")
    assert isinstance(ds, torch.utils.data.Dataset) and len(ds) == len(patches) == 12
    for i, p in enumerate(patches):
        image, label = ds[i]
        assert image.dtype == np.uint8 and image.shape == (96, 96, 3)
        np.testing.assert_array_equal(image, expected[p])
        assert label == slides.index(p.slide)
    tensors = PatchDataset(patches, method="macenko", params=ds.params, as_tensor=True)
    x = tensors[-1]
    assert x.dtype == torch.float32 and tuple(x.shape) == (3, 96, 96) and 0 <= float(x.min()) <= float(x.max()) <= 1
    torch.testing.assert_close(x, torch.from_numpy(expected[patches[-1]]).permute(2, 0, 1).float() / 255)
    raw = PatchDataset(patches[:1])[0]
    assert not np.array_equal(raw, expected[patches[0]])  # without a method: the slide's own pixels
    with pytest.raises(IndexError):
        ds[12]
    with pytest.raises(ValueError, match="3 labels for 12 patches"):
        PatchDataset(patches, [0, 1, 2])


def test_slides_are_opened_lazily_once_per_process_and_never_pickled(torch, patches, expected):
    from vipsnorm.training.datasets import PatchDataset

    ds = PatchDataset(patches, method="macenko", max_open=1)
    assert not ds._readers  # nothing opened until a patch is read
    first, last = patches[0], patches[-1]
    np.testing.assert_array_equal(ds[0], expected[first])
    reader = ds._reader(first.slide)
    ds[1]
    assert ds._reader(first.slide) is reader  # opened once, reused
    np.testing.assert_array_equal(ds[len(patches) - 1], expected[last])
    assert list(ds._readers) == [last.slide]  # max_open=1: the other slide was closed
    state = pickle.dumps(ds)  # holds no pyvips or OpenSlide object (they cannot be pickled)
    clone = pickle.loads(state)
    assert not clone._readers and clone.params == ds.params
    np.testing.assert_array_equal(clone[0], expected[first])
    # a forked worker inherits the parent's open slides: it opens its own instead
    ds._pid = -1
    ds[0]
    assert ds._reader(first.slide) is not reader
    # threads (Keras runs batches in threads) share the process's slides
    from concurrent.futures import ThreadPoolExecutor

    threaded = PatchDataset(patches, method="macenko", params=ds.params, max_open=1)
    with ThreadPoolExecutor(4) as pool:
        images = list(pool.map(threaded.__getitem__, list(range(len(patches))) * 2))
    for i, image in enumerate(images):
        np.testing.assert_array_equal(image, expected[patches[i % len(patches)]])


def test_dataloader_workers_give_what_this_process_gives(torch, patches):
    from vipsnorm.training.datasets import PatchDataset

    jitter = A.Compose([A.RandomStainJitter(), A.RandomClahe(grid=(4, 4))])
    ds = PatchDataset(patches, list(range(len(patches))), method="macenko", transform=jitter, seed=5, as_tensor=True)
    here = torch.stack([ds[i][0] for i in range(len(ds))])
    spawned = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, multiprocessing_context="spawn")
    for loader in (spawned, ds.loader(batch_size=4, num_workers=1)):  # spawned; from a fork server
        batches = list(loader)
        assert torch.equal(torch.cat([x for x, _ in batches]), here)  # per-item generators: any process
        assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(len(patches)))
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], here[0])  # a new epoch, new draws


def _read_in_a_forked_child(ds, index):
    try:
        return ds.image(index).shape
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def test_a_worker_forked_from_a_libvips_process_fails_clearly_instead_of_hanging(patches):
    import multiprocessing

    from vipsnorm.training.datasets import PatchSource

    ds = PatchSource(patches[:2], method="equalize")  # the fit started libvips' threads here
    with multiprocessing.get_context("fork").Pool(1) as pool:
        outcome = pool.apply_async(_read_in_a_forked_child, (ds, 0)).get(timeout=60)
    assert outcome.startswith("ForkedWorkerError") and "forkserver" in outcome


def test_keras_dataset_batches(keras, patches, expected):
    from vipsnorm.training.datasets import KerasPatchDataset

    labels = [i % 3 for i in range(len(patches))]
    ds = KerasPatchDataset(patches, labels, method="macenko", batch_size=5, seed=1)
    assert isinstance(ds, keras.utils.PyDataset) and len(ds) == math.ceil(12 / 5) == 3
    seen = []
    for b in range(len(ds)):
        x, y = ds[b]
        assert x.dtype == np.float32 and x.shape[1:] == (96, 96, 3) and len(x) == len(y) == (5 if b < 2 else 2)
        for image, label in zip(x, y):
            i = next(
                i
                for i, p in enumerate(patches)
                if np.array_equal(image, expected[p].astype(np.float32) / 255) and i not in seen
            )
            assert label == labels[i]
            seen.append(i)
    assert sorted(seen) == list(range(12))  # every patch once an epoch, shuffled
    order = list(ds._order)
    assert order != sorted(order)
    again = KerasPatchDataset(patches, labels, method="macenko", params=ds.params, batch_size=5, seed=1)
    assert list(again._order) == order  # seeded: the same order
    ds.on_epoch_end()
    assert list(ds._order) != order and sorted(ds._order) == sorted(order)
    plain = KerasPatchDataset(patches, method="macenko", params=ds.params, batch_size=4, shuffle=False, dtype="uint8")
    np.testing.assert_array_equal(plain[0][1], expected[patches[1]])  # no labels: x only, in order
    pickle.loads(pickle.dumps(ds))  # safe for Keras' multiprocessing too


def test_dataset_from_a_patches_table(torch, small_slide, tmp_path, capsys):
    from vipsnorm.training.cli import main as patches_main
    from vipsnorm.training.datasets import PatchDataset

    assert (
        patches_main(
            [
                str(small_slide),
                "-o",
                str(tmp_path / "p"),
                "--random",
                "4",
                "--size",
                "64",
                "--method",
                "equalize",
                "--format",
                "npy",
            ]
        )
        == 0
    )
    capsys.readouterr()
    ds = PatchDataset.from_table(tmp_path / "p" / "patches.csv", labels=lambda p: p.tissue > 0.8, method="equalize")
    import csv

    with open(tmp_path / "p" / "patches.csv") as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):
        image, label = ds[i]
        np.testing.assert_array_equal(image, np.load(tmp_path / "p" / row["file"]))  # the files the command wrote
        assert label == (float(row["tissue"]) > 0.8)


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"vipsnorm_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torch_example_trains(torch, tmp_path, capsys):
    result = _example("train_torch").main(
        ["--out", str(tmp_path), "--steps", "2", "--size", "768", "--patches", "16", "--batch", "8"]
    )
    assert len(result["losses"]) == 2 and all(np.isfinite(result["losses"]))
    assert result["patches"] == 32 and result["batch_shape"] == (8, 3, 128, 128)


def test_keras_example_trains_and_saves_its_layers(keras, tmp_path, capsys):
    result = _example("train_keras").main(
        ["--out", str(tmp_path), "--steps", "2", "--size", "768", "--patches", "16", "--batch", "8"]
    )
    assert len(result["losses"]) == 1 and np.isfinite(result["losses"][0]) and result["patches"] == 32
    model = keras.models.load_model(result["model"])  # the vipsnorm layers come back from their config
    assert [type(layer).__name__ for layer in model.layers][:2] == ["RandomStainJitter", "RandomClahe"]
    x = np.random.default_rng(0).random((2, 128, 128, 3)).astype(np.float32)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(x, training=False)),
        keras.ops.convert_to_numpy(model.predict(x, verbose=0)),
        atol=1e-6,
    )


@pytest.fixture
def rooted_table(two_slides, patches, tmp_path) -> tuple[Path, Path, list[str]]:
    """A table naming the slides relative to a folder (as ``cd ROOT && vipsnorm patches s0.tif ...``
    writes it): its path, the folder, and the slide names as the table writes them."""
    import dataclasses

    from vipsnorm.training.patches import write_table

    root = tmp_path / "root"
    root.mkdir()
    names = []
    for i, slide in enumerate(two_slides):
        names.append(f"s{i}.tif")
        (root / names[-1]).symlink_to(slide)
    index = {str(s): i for i, s in enumerate(two_slides)}
    rows = [dataclasses.replace(p, slide=names[index[p.slide]]).to_row() for p in patches]
    return write_table(tmp_path / "patches.csv", rows), root, names


def test_from_table_with_root_takes_labels_and_params_keyed_as_the_table_writes_them(
    torch, rooted_table, patches, monkeypatch
):
    from vipsnorm.training import datasets
    from vipsnorm.training.datasets import PatchDataset

    table, root, names = rooted_table
    rooted = [str(root / n) for n in names]
    expected_labels = [0] * 6 + [1] * 6  # the fixture's patches: 6 of each slide, in order
    for labels in ({names[0]: 0, names[1]: 1}, {rooted[0]: 0, rooted[1]: 1}, {names[0]: 0, rooted[1]: 1}):
        ds = PatchDataset.from_table(table, labels=labels, root=root)
        assert [p.slide for p in ds.patches] == [rooted[0]] * 6 + [rooted[1]] * 6
        assert ds.labels == expected_labels
    assert PatchDataset.from_table(table, labels=lambda p: p.slide, root=root).labels[0] == rooted[0]
    with pytest.raises(ValueError, match="two different values"):
        PatchDataset.from_table(table, labels={names[0]: 0, rooted[0]: 1, names[1]: 1}, root=root)
    with pytest.raises(ValueError, match=r"no label for slide\(s\).*keyed by the patches' slide paths"):
        PatchDataset.from_table(table, labels={names[0]: 0}, root=root)

    # params keyed as in the table: used, nothing fitted
    fitted = PatchDataset(patches, method="macenko").params
    by_name = {names[i]: fitted[str(s)] for i, s in enumerate(dict.fromkeys(p.slide for p in patches))}

    def no_fit(*args, **kwargs):
        raise AssertionError("a slide with given params was fitted")

    monkeypatch.setattr(datasets, "fit_slide", no_fit)
    ds = PatchDataset.from_table(table, labels={names[0]: 0, names[1]: 1}, root=root, method="macenko", params=by_name)
    assert ds.params == {rooted[i]: by_name[n] for i, n in enumerate(names)}
    image, label = ds[7]
    assert image.shape == (96, 96, 3) and label == 1
    # a key that matches no slide while a slide has none: an error, not a silent fit
    with pytest.raises(ValueError, match=r"params has entries for slide\(s\) \['s9.tif'\].*none for slide\(s\)"):
        misspelt = {names[0]: by_name[names[0]], "s9.tif": by_name[names[1]]}
        PatchDataset.from_table(table, root=root, method="macenko", params=misspelt)
    with pytest.raises(ValueError, match=r"params has entries for slide\(s\) \['s0.tif', 's1.tif'\]"):
        PatchDataset(datasets.patches_from_table(table, root), method="macenko", params=by_name)  # not from_table

    # a table of absolute paths: keys are those paths, root or not
    absolute = PatchDataset.from_table(table, root=root).patches
    from vipsnorm.training.patches import write_table

    write_table(table.parent / "abs.csv", [p.to_row() for p in absolute])
    ds = PatchDataset.from_table(table.parent / "abs.csv", labels={rooted[0]: 0, rooted[1]: 1}, root=root / "elsewhere")
    assert ds.labels == expected_labels and [p.slide for p in ds.patches] == [p.slide for p in absolute]


def test_keras_from_table_with_root_takes_labels_keyed_as_the_table_writes_them(keras, rooted_table):
    from vipsnorm.training.datasets import KerasPatchDataset

    table, root, names = rooted_table
    ds = KerasPatchDataset.from_table(table, labels={names[0]: 0, names[1]: 1}, root=root, batch_size=12, shuffle=False)
    x, y = ds[0]
    assert x.shape == (12, 96, 96, 3) and y.tolist() == [0] * 6 + [1] * 6


class _TorchvisionCompose:
    """``torchvision.transforms.Compose.__call__``, verbatim: calls ``t(img)``, no rng."""

    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img


def test_a_seeded_dataset_warns_once_made_when_its_transform_takes_no_rng(torch, patches, monkeypatch):
    import warnings

    from vipsnorm.training import datasets
    from vipsnorm.training.datasets import PatchDataset

    monkeypatch.setattr(datasets, "_WARNED_NO_RNG", set())
    members = [A.RandomStainJitter(seed=1), A.RandomStretch(seed=1)]
    with pytest.warns(UserWarning, match="takes no rng keyword.*depend on the number of loader workers") as caught:
        ds = PatchDataset(patches[:3], transform=_TorchvisionCompose(members), seed=0)
    assert len(caught) == 1 and caught[0].filename == __file__  # the line that made the dataset
    assert "vipsnorm.training.Compose" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds[0], ds[1]  # not again per item, nor for another dataset with a transform of that type
        PatchDataset(patches[:3], transform=_TorchvisionCompose(members[:1]), seed=1)
        seeded = PatchDataset(patches[:3], transform=A.Compose(members), seed=0)  # passes the item's rng
        PatchDataset(patches[:3], transform=members[0], seed=0)
        PatchDataset(patches[:3], transform=_TorchvisionCompose(members))  # no seed: nothing promised
    # what the warning is about: the item's draws depend on what was read before, unless rng is passed
    first = [seeded[i] for i in (0, 1, 2)]
    np.testing.assert_array_equal(seeded[2], first[2])
    assert not np.array_equal(ds[2], ds[2])


def test_a_negative_seed_is_refused_when_the_dataset_is_made(torch, patches):
    from vipsnorm.training.datasets import PatchDataset

    for bad in (-1, 1.5, "0", True):
        with pytest.raises(ValueError, match="seed must be None or an integer >= 0"):
            PatchDataset(patches[:2], transform=A.RandomStretch(), seed=bad)
    assert PatchDataset(patches[:2], transform=A.RandomStretch(), seed=np.int64(3)).seed == 3
