"""CIFAR-10 on disk and in memory: read the python-version batches safely, write a synthetic
stand-in in the same layout, split the training set into site shards and rank batches."""

import io
import os
import pickle
import struct

import numpy as np
import torch
from numpy._core.multiarray import _reconstruct

BATCH_DIR = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
NUM_CLASSES = 10
IMAGE_BYTES = 3 * 32 * 32

# The only globals a CIFAR-10 pickle holds. Anything else could run code while loading.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class DataError(Exception):
    """The dataset is missing, is not CIFAR-10, or can't be split as asked; the message says what to do."""


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _ForbiddenGlobal(f"it refers to {module}.{name}, which a CIFAR-10 batch never does") from None


def read_pickle(path: str):
    """Unpickle a CIFAR-10 file, allowing only the numpy globals the format needs."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return _CifarUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except _ForbiddenGlobal as e:
        raise DataError(f"refusing to load {path}: {e}; delete it and run prepare_data.sh again") from None
    except Exception as e:
        raise DataError(f"{path} is truncated or corrupt ({e}); delete it and run prepare_data.sh again") from None


def read_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as (uint8 images N x 3 x 32 x 32, int64 labels N), checked against the format."""
    batch = read_pickle(path)
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise DataError(f"{path} is not a CIFAR-10 batch (no 'data' and 'labels'); run prepare_data.sh again")
    images, labels = batch["data"], np.asarray(batch["labels"])
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.ndim != 2
        or images.shape[1] != IMAGE_BYTES
    ):
        raise DataError(
            f"{path} is not a CIFAR-10 batch ('data' is not uint8 N x {IMAGE_BYTES}); run prepare_data.sh again"
        )
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
        raise DataError(f"{path} is not a CIFAR-10 batch (labels don't match the images); run prepare_data.sh again")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{path} has labels outside 0-{NUM_CLASSES - 1}; run prepare_data.sh again")
    # Rows are channel-major (1024 R, 1024 G, 1024 B), each a row-major 32 x 32 plane.
    return images.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def batch_paths(data_root: str) -> tuple[list[str], str]:
    """Paths of the five training batches and the test batch; a clear error if any is missing."""
    folder = os.path.join(data_root, BATCH_DIR)
    if not os.path.isdir(folder):
        raise DataError(f"no CIFAR-10 in {data_root} (expected {folder}); run: bash prepare_data.sh")
    missing = [name for name in TRAIN_FILES + [TEST_FILE] if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise DataError(f"CIFAR-10 in {folder} is incomplete (missing {', '.join(missing)}); run: bash prepare_data.sh")
    return [os.path.join(folder, name) for name in TRAIN_FILES], os.path.join(folder, TEST_FILE)


def load_cifar10(data_root: str):
    """The whole dataset as tensors: (train_x, train_y, test_x, test_y), images uint8 N x 3 x 32 x 32."""
    train_paths, test_path = batch_paths(data_root)
    train = [read_batch(path) for path in train_paths]
    test_x, test_y = read_batch(test_path)
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    return torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(test_x), torch.from_numpy(test_y)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to floats in [-1, 1]: the original example's ToTensor + Normalize((0.5,)*3, (0.5,)*3)."""
    return images.float().div_(127.5).sub_(1.0)


def partition_indices(
    labels: torch.Tensor, sites: list[str], site: str, alpha: float | None, seed: int, min_size: int = 1
) -> torch.Tensor:
    """The training indices that belong to `site`: disjoint shards that together cover the set.

    Every site computes all shards from the same seed and site list, and keeps its own, so no
    state is shared. alpha=None is IID (equal random shards); otherwise each class is spread over
    the sites by Dirichlet(alpha) proportions, redrawn until every shard has min_size samples.
    """
    rng = np.random.default_rng(seed)
    labels = labels.numpy()
    num_sites = len(sites)
    if alpha is None:
        shards = np.array_split(rng.permutation(len(labels)), num_sites)
    else:
        for _ in range(1000):
            shards = [[] for _ in sites]
            for c in range(NUM_CLASSES):
                members = rng.permutation(np.flatnonzero(labels == c))
                cuts = (np.cumsum(rng.dirichlet([alpha] * num_sites))[:-1] * len(members)).astype(int)
                for shard, part in zip(shards, np.split(members, cuts)):
                    shard.append(part)
            shards = [np.sort(np.concatenate(parts)) for parts in shards]
            if min(len(s) for s in shards) >= min_size:
                break
        else:
            raise DataError(f"alpha={alpha} leaves a site with fewer than {min_size} samples; use a larger --alpha")
    return torch.from_numpy(np.asarray(shards[sites.index(site)], dtype=np.int64))


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int) -> list[torch.Tensor]:
    """The site's batches of positions 0..n-1 for one epoch: one shuffle, drawn from the seed and the epoch alone,
    cut into batches of batch_size (the last one may be smaller). Every rank computes the same list, whatever the
    number of ranks, so the site visits its samples in the same order on 1 GPU or on 8."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return list(torch.randperm(n, generator=g).split(batch_size))


# Random crops: the image padded by this many pixels on each side (reflected), then cropped back to 32 x 32.
CROP_PAD = 4


def epoch_augmentation(n: int, epoch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The random crop and flip of each of the n samples in one epoch: (offsets n x 2, each 0..2*CROP_PAD;
    flips n, bool). Drawn per sample from the seed and the epoch alone, like the shuffle, so a run is
    reproducible, and a sample is augmented the same way whichever rank trains it."""
    g = torch.Generator().manual_seed((seed * 100_003 + epoch) * 2 + 1)  # a stream apart from the shuffle's
    return torch.randint(0, 2 * CROP_PAD + 1, (n, 2), generator=g), torch.rand(n, generator=g) < 0.5


def crop_and_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Each image (float, N x C x H x W) cropped at its own offset from its reflect-padded self, and mirrored where
    flips says: one gather on the device, no per-sample Python."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (CROP_PAD,) * 4, mode="reflect")
    rows = offsets[:, :1] + torch.arange(h, device=images.device)  # n x h
    columns = torch.arange(w, device=images.device).expand(n, w)
    columns = offsets[:, 1:] + torch.where(flips[:, None], w - 1 - columns, columns)  # n x w
    return padded[
        torch.arange(n, device=images.device)[:, None, None, None],
        torch.arange(images.shape[1], device=images.device)[None, :, None, None],
        rows[:, None, :, None],
        columns[:, None, None, :],
    ]


def rank_share(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's part of a site batch: the ranks' parts are disjoint, cover the batch, and differ in size by at most
    one sample (a rank's part is empty when the batch has fewer samples than the site has ranks)."""
    return torch.tensor_split(batch, world_size)[rank]


class _Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle wrote CIFAR-10: byte strings as BINSTRING and numpy's
    reconstructor under its old name, so no `_codecs.encode` appears in the file."""

    dispatch = dict(pickle._Pickler.dispatch)
    _GLOBALS = {
        _reconstruct: b"numpy.core.multiarray\n_reconstruct\n",
        np.ndarray: b"numpy\nndarray\n",
        np.dtype: b"numpy\ndtype\n",
    }

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_str(self, obj):
        self.save_bytes(obj.encode("latin1"))

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str

    def save_global(self, obj, name=None):
        self.write(pickle.GLOBAL + self._GLOBALS[obj])
        self.memoize(obj)

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            assert obj.dtype == np.uint8, "only uint8 arrays occur in CIFAR-10"
            return _reconstruct, (np.ndarray, (0,), b"b"), (1, obj.shape, obj.dtype, False, obj.tobytes())
        if isinstance(obj, np.dtype):
            return np.dtype, ("u1", False, True), (3, "|", None, None, None, -1, -1, 0)
        return NotImplemented


def write_pickle(path: str, obj) -> None:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)


# The synthetic stand-ins, by name: images per training batch file (five of them) and in the test file,
# and how the images are drawn. "standard" is easy and smooth; "small" is a few sharp images per site,
# where a learning rate that is too bold shows: the global model dips, or collapses, from round to round.
SYNTHETIC_PRESETS = {
    "standard": {"per_batch": 2000, "test": 2000, "clutter": 0.9, "noise": 0.8, "contrast": 40},
    "small": {"per_batch": 300, "test": 1000, "clutter": 0.3, "noise": 0.3, "contrast": 70},
}


def synthetic_images(
    labels: np.ndarray, templates: np.ndarray, rng: np.random.Generator, clutter: float, noise: float, contrast: float
) -> np.ndarray:
    """Noisy, shifted, rescaled copies of each label's template: learnable, but not at a glance."""
    n = len(labels)
    # Smooth per-image clutter: coarse random colour fields, upsampled 8x.
    fields = np.kron(rng.normal(0, 1, (n, 3, 4, 4)), np.ones((1, 1, 8, 8)))
    images = templates[labels] * rng.uniform(0.4, 1.2, (n, 1, 1, 1)) + clutter * fields
    images += rng.normal(0, noise, images.shape)
    shifts = rng.integers(-3, 4, (n, 2))
    for i, (dy, dx) in enumerate(shifts):
        images[i] = np.roll(images[i], (dy, dx), axis=(1, 2))
    return np.clip(127.5 + contrast * images, 0, 255).astype(np.uint8).reshape(n, IMAGE_BYTES)


def synthetic_preset(data_root: str) -> str | None:
    """The name of the synthetic stand-in in `data_root`, or None for anything else (the real CIFAR-10, nothing)."""
    meta_path = os.path.join(data_root, BATCH_DIR, META_FILE)
    if not os.path.isfile(meta_path):
        return None
    meta = read_pickle(meta_path)
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path} is not CIFAR-10's batches.meta (not a dict); run prepare_data.sh again")
    if not meta.get("synthetic", False):
        return None
    return meta.get("preset", "standard")


def is_synthetic(data_root: str) -> bool:
    return synthetic_preset(data_root) is not None


def write_synthetic(data_root: str, preset: str = "standard", seed: int = 0) -> str:
    """Write a learnable stand-in for CIFAR-10 (a SYNTHETIC_PRESETS name) in the python-version layout;
    returns its folder."""
    spec = SYNTHETIC_PRESETS[preset]
    rng = np.random.default_rng(seed)
    folder = os.path.join(data_root, BATCH_DIR)
    os.makedirs(folder, exist_ok=True)
    # One template a class: a random 8 x 8 colour pattern, upsampled to 32 x 32.
    templates = np.kron(rng.normal(0, 1, (NUM_CLASSES, 3, 8, 8)), np.ones((1, 1, 4, 4)))
    for name in TRAIN_FILES + [TEST_FILE]:
        n = spec["test"] if name == TEST_FILE else spec["per_batch"]
        labels = rng.integers(0, NUM_CLASSES, n)
        write_pickle(
            os.path.join(folder, name),
            {
                "batch_label": f"SYNTHETIC stand-in for CIFAR-10 ({preset}), {name}",
                "labels": [int(v) for v in labels],
                "data": synthetic_images(labels, templates, rng, spec["clutter"], spec["noise"], spec["contrast"]),
                "filenames": [f"synthetic_{name}_{i:05d}.png" for i in range(n)],
            },
        )
    write_pickle(
        os.path.join(folder, META_FILE),
        {
            "synthetic": True,
            "preset": preset,
            "label_names": [f"synthetic_class_{c}" for c in range(NUM_CLASSES)],
            "num_cases_per_batch": spec["per_batch"],
            "num_vis": IMAGE_BYTES,
        },
    )
    return folder
