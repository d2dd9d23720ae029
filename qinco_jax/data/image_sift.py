"""A built-in real data set, no download: dense SIFT descriptors of the sample images
that scikit-image ships inside its wheel.

Why it resembles BigANN (ANN_SIFT1B): the same descriptor (SIFT, 128-d: 4 x 4 spatial
cells x 8 orientation bins, normalised and quantised to unsigned bytes), so the same
dimension, dtype and value range, and computed on natural photographs. BigANN's
keypoints are detected (Hessian-affine); here they lie on a fixed dense grid at a few
scales, which keeps the set deterministic and large enough from few images.

Construction (deterministic):
  1. the natural images of `IMAGES`, read as 8-bit grey from scikit-image's own data
     folder (only files bundled in the wheel: the pooch-downloaded ones are never used);
  2. keypoints on a grid of step `GRID_STEP` at every size of `KEYPOINT_SIZES`, far
     enough from the border that the descriptor window lies inside the image, in image
     then size then row then column order;
  3. a seeded permutation of all keypoints; descriptors are computed (OpenCV's SIFT,
     orientation 0: the upright variant) in that order until enough informative ones
     are found — flat patches (all-zero or near-constant descriptors) and exact
     duplicates are skipped — and split into learn, base, query in that order;
  4. exact L2 ground truth of the queries in the base (100 neighbours).

The files are written once (under the data root when opened through
`datasets.sift_images_dataset`), in BigANN's layout and format
(`learn.bvecs`, `base.bvecs`, `query.bvecs`, `gt.ivecs`) plus `info.json` recording the
recipe; later calls read them. A cache built with another recipe or size is rebuilt.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qinco_jax.data.groundtruth import GT_K, exact_groundtruth
from qinco_jax.formats import vecs_io
from qinco_jax.formats.io import atomic_path

# Natural photographs and micrographs of skimage.data (synthetic drawings, binary
# silhouettes, text pages and chessboards are left out).
IMAGES = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
          "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
          "moon.png", "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg")
GRID_STEP = 4                  # pixels between keypoints
KEYPOINT_SIZES = (12, 16, 24, 32)  # SIFT keypoint diameters (pixels)
MIN_DESCRIPTOR_SUM = 512       # below this, the patch is too flat to be informative
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SiftImagesSpec:
    """How many vectors of each role, and the seed of the keypoint permutation."""

    nt: int = 100_000
    nb: int = 50_000
    nq: int = 5_000     # enough for recall differences of ~0.01 to stand out of the sampling noise
    seed: int = 0

    def __post_init__(self):
        for key in ("nt", "nb", "nq"):
            if getattr(self, key) < 1:
                raise ValueError(f"sift_images: {key} must be >= 1, got {getattr(self, key)}")

    @property
    def total(self) -> int:
        return self.nt + self.nb + self.nq


# The registered data sets: "sift_images" is sized for the main job.
NAMED_SPECS = {"sift_images": SiftImagesSpec()}


def _require_packages():
    try:
        import cv2
        import skimage.data
    except ImportError as e:
        raise ImportError(f"the sift_images data set needs OpenCV and scikit-image ({e}): "
                          f"pip install 'qinco-jax[demo]' (opencv-python-headless, scikit-image)") from None
    return cv2, Path(skimage.data.__file__).parent


def load_images() -> list[np.ndarray]:
    """The images of IMAGES as uint8 grey arrays, from scikit-image's bundled data."""
    cv2, folder = _require_packages()
    images = []
    for name in IMAGES:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: this scikit-image does not bundle {name}")
        im = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if im is None:
            raise ValueError(f"{path}: OpenCV could not read it")
        images.append(im)
    return images


def keypoint_grid(shapes: list[tuple[int, int]]) -> np.ndarray:
    """(n, 4) int32 rows (image, x, y, size): every grid keypoint whose descriptor window
    lies inside its image, in image, size, row, column order."""
    rows = []
    for i, (h, w) in enumerate(shapes):
        for size in KEYPOINT_SIZES:
            # the descriptor window spans about 1.5 * size around the centre (4 cells of 3 sigma)
            margin = int(np.ceil(0.75 * size)) + 1
            ys = np.arange(margin, h - margin, GRID_STEP)
            xs = np.arange(margin, w - margin, GRID_STEP)
            yy, xx = np.meshgrid(ys, xs, indexing="ij")
            n = yy.size
            rows.append(np.stack([np.full(n, i), xx.ravel(), yy.ravel(), np.full(n, size)], 1))
    return np.concatenate(rows).astype(np.int32)


def _describe(cv2, sift, image: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """SIFT descriptors (len(kps), 128) uint8 of the (x, y, size) keypoints, in order."""
    keypoints = [cv2.KeyPoint(float(x), float(y), float(s), 0.0) for x, y, s in kps]
    out, desc = sift.compute(image, keypoints)
    if desc is None or len(out) != len(keypoints):
        raise RuntimeError(f"OpenCV SIFT returned {0 if desc is None else len(out)} descriptors "
                           f"for {len(keypoints)} keypoints")
    # OpenCV's descriptors are already integers in [0, 255] stored as float
    return np.clip(np.rint(desc), 0, 255).astype(np.uint8)


def compute_descriptors(n: int, seed: int = 0, progress: bool | None = None) -> np.ndarray:
    """The first n informative, distinct descriptors (n, 128) uint8 in the seeded order."""
    cv2, _ = _require_packages()
    from tqdm import tqdm

    images = load_images()
    grid = keypoint_grid([im.shape for im in images])
    grid = grid[np.random.RandomState(seed).permutation(len(grid))]
    sift = cv2.SIFT_create()
    kept, seen, start = [], set(), 0
    bar = tqdm(total=n, desc="SIFT descriptors", unit="vec", disable=progress is False, leave=False)
    while len(kept) < n and start < len(grid):
        # a little more than still needed (flat patches and duplicates are skipped), one
        # SIFT call per image: its scale pyramid is built once per call
        part = grid[start:start + int(1.1 * (n - len(kept))) + 1024]
        start += len(part)
        desc = np.empty((len(part), 128), np.uint8)
        for i in np.unique(part[:, 0]):
            rows = np.flatnonzero(part[:, 0] == i)
            desc[rows] = _describe(cv2, sift, images[i], part[rows, 1:])
            bar.set_postfix_str(IMAGES[i])
        for row in desc[desc.sum(axis=1, dtype=np.int64) >= MIN_DESCRIPTOR_SUM]:
            key = row.tobytes()
            if key not in seen:
                seen.add(key)
                kept.append(row)
                if len(kept) == n:
                    break
        bar.update(len(kept) - bar.n)
    bar.close()
    if len(kept) < n:
        raise ValueError(f"the bundled images give only {len(kept)} informative SIFT descriptors, {n} asked")
    return np.stack(kept)


def build(folder: str | os.PathLike, spec: SiftImagesSpec, progress: bool | None = None) -> Path:
    """Compute the data set and write it to folder (learn/base/query .bvecs, gt.ivecs,
    info.json written last: its presence marks a complete build)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    x = compute_descriptors(spec.total, spec.seed, progress=progress)
    xt, xb, xq = x[:spec.nt], x[spec.nt:spec.nt + spec.nb], x[spec.nt + spec.nb:]
    gt = exact_groundtruth(xq, xb, GT_K).astype(np.int32)
    for name, array in zip(DATA_FILES, (xt, xb, xq, gt)):
        vecs_io.write_vectors(folder / name, array)
    with atomic_path(folder / "info.json", suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(recipe(spec), indent=1))
    return folder


def recipe(spec: SiftImagesSpec) -> dict:
    return {"format_version": FORMAT_VERSION, "images": list(IMAGES), "grid_step": GRID_STEP,
            "keypoint_sizes": list(KEYPOINT_SIZES), "min_descriptor_sum": MIN_DESCRIPTOR_SUM, **asdict(spec)}


DATA_FILES = ("learn.bvecs", "base.bvecs", "query.bvecs", "gt.ivecs")


def is_built(folder: str | os.PathLike, spec: SiftImagesSpec) -> bool:
    """Whether folder holds this recipe's build: its info.json, and every file it wrote
    (a file deleted since is rebuilt, not met later as an unreadable data set)."""
    info = Path(folder) / "info.json"
    try:
        same_recipe = json.loads(info.read_text()) == recipe(spec)
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return same_recipe and all((Path(folder) / name).is_file() for name in DATA_FILES)


def ensure_built(folder: str | os.PathLike, spec: SiftImagesSpec, progress: bool | None = None) -> Path:
    """The folder of the data set, built first if it is missing or was made otherwise."""
    if not is_built(folder, spec):
        info = Path(folder) / "info.json"
        if info.exists():
            info.unlink()  # a cache of another recipe: rebuilt below
        build(folder, spec, progress=progress)
    return Path(folder)
