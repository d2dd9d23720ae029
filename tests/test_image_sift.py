"""The built-in real data set: dense SIFT of scikit-image's bundled images."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("cv2", reason="the demo extra (opencv-python-headless) is not installed")
pytest.importorskip("skimage", reason="the demo extra (scikit-image) is not installed")

from qinco_jax.data import datasets  # noqa: E402
from qinco_jax.data import image_sift
from qinco_jax.formats import vecs_io

TINY = image_sift.SiftImagesSpec(nt=300, nb=400, nq=20, seed=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sift")
    return datasets.sift_images_dataset("tiny", TINY, root=root), root / "tiny"


def test_only_bundled_images_are_read():
    images = image_sift.load_images()
    assert len(images) == len(image_sift.IMAGES)
    assert all(im.dtype == np.uint8 and im.ndim == 2 and min(im.shape) >= 64 for im in images)


def test_shapes_dtype_and_bigann_layout(tiny):
    ds, folder = tiny
    assert (ds.d, ds.nt, ds.nb, ds.nq) == (128, 300, 400, 20)
    for name, n in (("learn", 300), ("base", 400), ("query", 20)):
        raw = vecs_io.read_vectors(folder / f"{name}.bvecs")
        assert raw.dtype == np.uint8 and raw.shape == (n, 128)
    x = np.concatenate([ds.get_train(), ds.get_database(), ds.get_queries()])
    assert x.dtype == np.float32
    # SIFT descriptors: scaled to norm 512 then saturated to bytes (so never above 512
    # plus rounding), none flat, all distinct
    norms = np.linalg.norm(x, axis=1)
    assert np.all((norms > 256) & (norms < 514)), (norms.min(), norms.max())
    assert len(np.unique(x, axis=0)) == len(x)


def test_groundtruth_is_exact(tiny):
    ds, _ = tiny
    xb, xq, gt = ds.get_database(), ds.get_queries(), ds.get_groundtruth()
    assert gt.shape == (20, 100)
    dist = ((xq[:, None, :].astype(np.float64) - xb[None]) ** 2).sum(-1)
    nearest = np.sort(dist, axis=1)[:, :100]
    np.testing.assert_array_equal(np.take_along_axis(dist, gt.astype(np.int64), 1), nearest)


def test_deterministic_and_prefix_of_a_larger_build(tiny, tmp_path):
    ds, folder = tiny
    again = image_sift.build(tmp_path / "again", TINY)
    for name in ("learn", "base", "query", "gt"):
        ext = "ivecs" if name == "gt" else "bvecs"
        np.testing.assert_array_equal(vecs_io.read_vectors(folder / f"{name}.{ext}"),
                                      vecs_io.read_vectors(again / f"{name}.{ext}"))
    other_seed = image_sift.compute_descriptors(50, seed=4)
    assert not np.array_equal(other_seed, vecs_io.read_vectors(folder / "learn.bvecs")[:50])


def test_cache_is_reused_and_rebuilt_when_the_recipe_changes(tiny, tmp_path, monkeypatch):
    ds, folder = tiny
    stamp = os.stat(folder / "base.bvecs").st_mtime_ns

    def fail(*a, **k):
        raise AssertionError("rebuilt a cached data set")

    monkeypatch.setattr(image_sift, "compute_descriptors", fail)
    cached = datasets.sift_images_dataset("tiny", TINY, root=folder.parent)
    assert os.stat(folder / "base.bvecs").st_mtime_ns == stamp
    np.testing.assert_array_equal(cached.get_groundtruth(), ds.get_groundtruth())
    monkeypatch.undo()
    bigger = image_sift.SiftImagesSpec(nt=300, nb=410, nq=20, seed=3)
    assert not image_sift.is_built(folder, bigger)
    assert datasets.sift_images_dataset("tiny", bigger, root=folder.parent).nb == 410


def test_registered_name_and_errors(tmp_path, monkeypatch):
    assert "sift_images" in datasets.AVAILABLE_NAMES
    with pytest.raises(ValueError, match="nq must be >= 1"):
        image_sift.SiftImagesSpec(nq=0)
    with pytest.raises(ValueError, match="unknown sift_images data set"):
        datasets.sift_images_dataset("sift_nope")
    monkeypatch.setenv("QINCO_DATA", str(tmp_path))
    monkeypatch.setattr(image_sift, "NAMED_SPECS", {"sift_images": TINY})
    ds = datasets.get_dataset("sift_images")
    assert ds.name == "sift_images" and ds.nb == 400 and (tmp_path / "sift_images" / "info.json").exists()


def test_a_file_deleted_from_a_build_is_rebuilt(tmp_path):
    """info.json alone does not make a build: a data file removed since (by hand, a
    disk clean-up) is written again instead of failing later on a missing file."""
    gt = datasets.sift_images_dataset("tiny", TINY, root=tmp_path).get_groundtruth()
    (tmp_path / "tiny" / "gt.ivecs").unlink()
    assert not image_sift.is_built(tmp_path / "tiny", TINY)
    rebuilt = datasets.sift_images_dataset("tiny", TINY, root=tmp_path)
    np.testing.assert_array_equal(rebuilt.get_groundtruth(), gt)
