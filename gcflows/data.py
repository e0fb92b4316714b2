"""Datasets: image sets from local files and a minibatch sampler.

- Gaussian-mixture targets (2D presets, the high-dimensional ones and the digits-like mixture)
  are built by :func:`gcflows.gmm.get_preset`: the mixture is both the sampler and the oracle.
- Images, always returned as ``(images (N, C, H, W) float in [-1, 1], labels (N,) int64)``:

  * ``load_digits``: scikit-learn's bundled 8x8 digits (no download, the CPU default);
    pixel values ``0..16`` map to ``x / 8 - 1``, so exactly ``[-1, 1]``.
  * ``load_mnist(root)`` / ``load_cifar10(root)``: from a folder the user names, in torchvision's
    on-disk formats or as ``.npz``. Nothing is ever downloaded: a missing file raises
    ``FileNotFoundError`` saying which file was expected where and how to get it.

  ``uint8`` pixels map to ``x / 127.5 - 1``; float pixels must be in ``[0, 1]`` and map to
  ``2 x - 1`` (no per-image or per-batch rescaling anywhere).
- ``TensorSampler``: minibatches without replacement within an epoch, deterministic given the
  generator, with ``state_dict`` / ``load_state_dict`` for exact resume; ``sample_batch`` for a
  one-shot draw.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gcflows.checks import bad, choice, integer

__all__ = [
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_FRACTION",
    "IMAGE_SHAPES",
    "image_shape",
    "check_image_shape",
    "load_digits",
    "load_mnist",
    "load_cifar10",
    "load_npz_images",
    "read_idx",
    "get_image_dataset",
    "TensorSampler",
    "sample_batch",
]

# ------------------------------------------------------------------------------------------------
# image shapes
# ------------------------------------------------------------------------------------------------

IMAGE_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits": (1, 8, 8),
    "mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
}


def image_shape(name: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of the image dataset ``name`` (``digits``, ``mnist`` or ``cifar10``)."""
    return IMAGE_SHAPES[choice(name, "name", sorted(IMAGE_SHAPES))]


def check_image_shape(images: Tensor, expected: tuple[int, ...], preset_name: str) -> Tensor:
    """Raise ``ValueError`` naming ``preset_name`` unless ``images`` is ``(N, *expected)``."""
    expected = tuple(int(s) for s in expected)
    if not torch.is_tensor(images):
        raise bad("type(images)", type(images).__name__, "pass a torch.Tensor")
    if images.dim() != len(expected) + 1 or tuple(images.shape[1:]) != expected:
        raise bad(
            "images.shape",
            tuple(images.shape),
            f"preset {preset_name!r} expects images of shape (N, {', '.join(map(str, expected))}) "
            "(C, H, W); use a preset made for this data "
            "(e.g. digits_* for 8x8, cifar10_* for 3x32x32) or convert the images first",
        )
    return images


# ------------------------------------------------------------------------------------------------
# scikit-learn digits (embedded, the default)
# ------------------------------------------------------------------------------------------------

#: Seed of the numpy ``default_rng`` permutation that splits the digits, class by class.
DIGITS_SPLIT_SEED = 20240610
#: Fraction of each class held out as the test split (rounded to the nearest integer per class).
DIGITS_TEST_FRACTION = 0.2


def _check_split(split: str) -> None:
    choice(split, "split", ("train", "test", "all"))


def _check_dtype(dtype: torch.dtype) -> None:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise bad("dtype", dtype, "use a floating torch.dtype (e.g. torch.float32)")


def _digits_split_indices() -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of the 1797 digits: ``(train_idx, test_idx)``, sorted.

    For each class c (in 0..9 order), the indices of class c are permuted by one shared
    ``np.random.default_rng(DIGITS_SPLIT_SEED)`` and the first ``round(DIGITS_TEST_FRACTION n_c)``
    go to the test split. Independent of any global random state.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    target = np.asarray(_sk_load_digits().target)
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    test = []
    for c in range(10):
        idx = np.flatnonzero(target == c)
        perm = rng.permutation(idx)
        test.append(perm[: int(round(DIGITS_TEST_FRACTION * len(idx)))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(target)), test_idx)
    return train_idx, test_idx


def load_digits(split: str = "train", dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits as ``(images (N, 1, 8, 8) in [-1, 1], labels (N,) int64)``.

    Pixels ``0..16`` map to ``x / 8 - 1`` (0 -> -1, 16 -> 1). ``split``: ``"train"`` (1438
    images), ``"test"`` (359) or ``"all"`` (1797), from the stratified split described in
    :func:`_digits_split_indices` (seed :data:`DIGITS_SPLIT_SEED`, 20 % per class held out).
    Bundled with scikit-learn: nothing is downloaded.
    """
    _check_split(split)
    _check_dtype(dtype)
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)  # (1797, 8, 8), values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    if split != "all":
        train_idx, test_idx = _digits_split_indices()
        idx = train_idx if split == "train" else test_idx
        images, labels = images[idx], labels[idx]
    x = torch.from_numpy(images / 8.0 - 1.0).unsqueeze(1).to(dtype)
    return x, torch.from_numpy(labels)


# ------------------------------------------------------------------------------------------------
# pixel conversion shared by the file loaders
# ------------------------------------------------------------------------------------------------


def _to_nchw(images: np.ndarray, source: str) -> np.ndarray:
    """``(N, H, W)`` / ``(N, H, W, C)`` / unambiguous ``(N, C, H, W)`` -> ``(N, C, H, W)``."""
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4:
        if images.shape[-1] in (1, 3):
            return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        if images.shape[1] in (1, 3):
            return images
    raise ValueError(
        f"images in {source} must have shape (N, H, W) or (N, H, W, C) with C in (1, 3), "
        f"got {images.shape}"
    )


def _scale_pixels(images: np.ndarray, source: str, dtype: torch.dtype) -> Tensor:
    """uint8 ``0..255`` -> ``x / 127.5 - 1``; float in ``[0, 1]`` -> ``2 x - 1``."""
    if images.dtype == np.uint8:
        x = images.astype(np.float64) / 127.5 - 1.0
    elif np.issubdtype(images.dtype, np.floating):
        x = images.astype(np.float64)
        if not np.isfinite(x).all():
            raise ValueError(f"images in {source} contain NaN or inf")
        if x.size and (x.min() < 0.0 or x.max() > 1.0):
            raise ValueError(
                f"float images in {source} must lie in [0, 1], got [{x.min()}, {x.max()}]; "
                "store uint8 pixels or divide by 255 first (no rescaling is guessed)"
            )
        x = 2.0 * x - 1.0
    else:
        raise ValueError(f"images in {source} must be uint8 or float, got dtype {images.dtype}")
    return torch.from_numpy(x).to(dtype)


def _check_labels(labels: np.ndarray, n: int, source: str) -> Tensor:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"labels in {source} must have shape ({n},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels in {source} must be integers, got dtype {labels.dtype}")
    return torch.from_numpy(labels.astype(np.int64))


def load_npz_images(
    path: str | os.PathLike, split: str = "train", dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Images from a ``.npz`` file: ``(images (N, C, H, W) in [-1, 1], labels (N,) int64)``.

    Accepted arrays: ``images`` (``(N, H, W)`` or ``(N, H, W, C)``, uint8 or float in [0, 1]) with
    ``labels`` (N,) -- the file is then one split, named by its file name: ``<name>_test.npz``
    serves only ``split="test"``, any other name serves ``"train"`` and ``"all"`` (so a training
    set is never used as an evaluation reference by accident, nor the reverse); or Keras-style
    ``x_train``, ``y_train``, ``x_test``, ``y_test``, which are split-aware (``"all"``
    concatenates train then test).
    """
    _check_split(split)
    _check_dtype(dtype)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no .npz file at {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable .npz file ({err})") from err
    if "images" in arrays and "labels" in arrays:
        is_test_file = path.stem.endswith("_test")
        if (split == "test") != is_test_file:
            raise bad(
                "split",
                split,
                f"{path} holds a single split (arrays 'images', 'labels'): name the test split "
                "<name>_test.npz and the training split <name>_train.npz (or <name>.npz), in one "
                "folder, and pass the folder",
            )
        images, labels = arrays["images"], arrays["labels"]
    elif all(k in arrays for k in ("x_train", "y_train", "x_test", "y_test")):
        if split == "all":
            images = np.concatenate([arrays["x_train"], arrays["x_test"]])
            labels = np.concatenate([arrays["y_train"], arrays["y_test"]])
        else:
            images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
    else:
        raise ValueError(
            f"{path} must hold arrays 'images' and 'labels' (or x_train, y_train, x_test, "
            f"y_test), found {sorted(arrays)}"
        )
    images = _to_nchw(np.asarray(images), str(path))
    x = _scale_pixels(images, str(path), dtype)
    return x, _check_labels(np.asarray(labels).reshape(-1), x.shape[0], str(path))


# ------------------------------------------------------------------------------------------------
# MNIST (idx files, torchvision layout) and CIFAR-10 (python pickle batches)
# ------------------------------------------------------------------------------------------------

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_MNIST_HOWTO = (
    "gcflows never downloads data. To get MNIST, on a machine with internet run\n"
    "  python -c \"import torchvision as tv; [tv.datasets.MNIST('DIR', train=s, download=True) "
    'for s in (True, False)]"\n'
    "and copy DIR (it holds DIR/MNIST/raw/*-ubyte[.gz]) here, then pass root=DIR; or save arrays "
    "'images' (N, 28, 28) uint8 and 'labels' (N,) as mnist_train.npz / mnist_test.npz in one "
    "folder. The dataset's homepage is Yann LeCun's MNIST page (yann.lecun.com/exdb/mnist)."
)

_CIFAR_HOWTO = (
    "gcflows never downloads data. To get CIFAR-10, on a machine with internet run\n"
    "  python -c \"import torchvision as tv; tv.datasets.CIFAR10('DIR', download=True)\"\n"
    "(or fetch cifar-10-python.tar.gz from www.cs.toronto.edu/~kriz/cifar.html and untar it), "
    "copy DIR (it holds DIR/cifar-10-batches-py/) here and pass root=DIR; or save arrays "
    "'images' (N, 32, 32, 3) uint8 and 'labels' (N,) as cifar10_train.npz / cifar10_test.npz "
    "in one folder."
)

_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an idx file (the MNIST format; ``.gz`` read transparently) into a numpy array.

    Header: two zero bytes, a type byte (0x08 = uint8), the number of dimensions, then one
    big-endian int32 per dimension; the data follow in C order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read idx file {path} ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number {raw[:4].hex()})")
    dt, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - header != count * dt.itemsize:
        raise ValueError(
            f"{path}: idx header announces shape {shape} ({count * dt.itemsize} bytes of data), "
            f"file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dt, offset=header).reshape(shape).astype(dt.newbyteorder("="))


def _find_file(folders: list[Path], name: str) -> Path | None:
    for folder in folders:
        for candidate in (folder / name, folder / (name + ".gz")):
            if candidate.is_file():
                return candidate
    return None


def _check_root(root: str | os.PathLike | None, dataset: str, howto: str) -> Path:
    if root is None:
        raise bad("root", root, f"pass the folder holding the {dataset} data.\n{howto}")
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{dataset} data folder {root} does not exist.\n{howto}")
    return root


def _npz_in_folder(folder: Path, stem: str, split: str) -> Path | None:
    for name in (f"{stem}_{split}.npz", f"{stem}.npz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _load_local(
    root: str | os.PathLike | None,
    split: str,
    dtype: torch.dtype,
    dataset: str,
    stem: str,
    howto: str,
    load_files: Callable[[Path, str, torch.dtype], tuple[Tensor, Tensor] | None],
    expected: Callable[[Path, str], str],
) -> tuple[Tensor, Tensor]:
    """What ``load_mnist`` and ``load_cifar10`` share around their file formats.

    Checks the arguments and ``root``; a ``.npz`` ``root`` is read as is; ``split="all"`` is
    train then test; otherwise ``load_files(root, split, dtype)`` (the dataset's own files, None
    when absent), then ``root/<stem>_<split>.npz`` or ``root/<stem>.npz``, else
    ``FileNotFoundError`` saying what was expected (``expected(root, split)``) and ``howto``.
    """
    _check_split(split)
    _check_dtype(dtype)
    root = _check_root(root, dataset, howto)
    if root.is_file():
        return load_npz_images(root, split, dtype)
    if split == "all":
        parts = [
            _load_local(root, s, dtype, dataset, stem, howto, load_files, expected)
            for s in ("train", "test")
        ]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    found = load_files(root, split, dtype)
    if found is not None:
        return found
    npz = _npz_in_folder(root, stem, split)
    if npz is not None:
        return load_npz_images(npz, split, dtype)
    raise FileNotFoundError(
        f"{dataset} {split} split not found: expected {expected(root, split)}, or "
        f"{root / f'{stem}_{split}.npz'}.\n{howto}"
    )


def _mnist_idx_files(root: Path, split: str, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
    folders = [root / "MNIST" / "raw", root / "raw", root]
    img_name, lbl_name = _MNIST_FILES[split]
    img_path, lbl_path = _find_file(folders, img_name), _find_file(folders, lbl_name)
    if img_path is None or lbl_path is None:
        return None
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{img_path} must hold uint8 images (N, H, W), got {images.dtype} {images.shape}"
        )
    x = _scale_pixels(images[:, None], str(img_path), dtype)
    return x, _check_labels(labels, x.shape[0], str(lbl_path))


def _mnist_expected(root: Path, split: str) -> str:
    img_name, lbl_name = _MNIST_FILES[split]
    return f"{img_name}[.gz] and {lbl_name}[.gz] in {root / 'MNIST' / 'raw'} (or {root})"


def load_mnist(
    root: str | os.PathLike, split: str = "train", dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """MNIST from a local folder: ``(images (N, 1, 28, 28) in [-1, 1], labels (N,) int64)``.

    Looked up in this order, for ``split`` in ``"train"`` / ``"test"`` (``"all"`` = both):
    torchvision's raw idx files (``train-images-idx3-ubyte`` etc., ``.gz`` or not) under
    ``root/MNIST/raw``, ``root/raw`` or ``root``; then ``root/mnist_<split>.npz`` or
    ``root/mnist.npz`` (see :func:`load_npz_images`). ``root`` may also be a ``.npz`` file.
    Nothing is downloaded: a missing file raises ``FileNotFoundError`` with how to get it.
    """
    return _load_local(
        root, split, dtype, "MNIST", "mnist", _MNIST_HOWTO, _mnist_idx_files, _mnist_expected
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, lists, dicts and bytes (CIFAR batches).

    A pickle from a user folder could otherwise run arbitrary code when loaded.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core.") :]
        return super().find_class(module, name)


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, AttributeError, ImportError) as err:
        raise ValueError(f"{path} is not a CIFAR-10 python batch ({err})") from err
    if not isinstance(batch, dict):
        raise ValueError(f"{path} must hold a dict with b'data' and b'labels'")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path} must hold keys b'data' and b'labels', found {sorted(batch)}")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    return data.reshape(-1, 3, 32, 32), np.asarray(batch["labels"]).reshape(-1)


def _cifar_batch_files(root: Path, split: str, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
    names = _cifar_names(split)
    for folder in (root / "cifar-10-batches-py", root):
        paths = [folder / n for n in names]
        present = [p.is_file() for p in paths]
        if all(present):
            batches = [_load_cifar_batch(p) for p in paths]
            images = np.concatenate([b[0] for b in batches])
            labels = np.concatenate([b[1] for b in batches])
            x = _scale_pixels(images, str(folder), dtype)
            return x, _check_labels(labels, x.shape[0], str(folder))
        if any(present):
            missing = [n for n, ok in zip(names, present, strict=True) if not ok]
            raise FileNotFoundError(
                f"CIFAR-10 {split} split incomplete in {folder}: missing {missing}.\n{_CIFAR_HOWTO}"
            )
    return None


def _cifar_names(split: str) -> list[str]:
    return [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]


def _cifar_expected(root: Path, split: str) -> str:
    return f"{', '.join(_cifar_names(split))} in {root / 'cifar-10-batches-py'} (or {root})"


def load_cifar10(
    root: str | os.PathLike, split: str = "train", dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """CIFAR-10 from a local folder: ``(images (N, 3, 32, 32) in [-1, 1], labels (N,) int64)``.

    Looked up in this order: the python pickle batches of ``cifar-10-python.tar.gz``
    (``data_batch_1`` .. ``data_batch_5`` for ``"train"``, ``test_batch`` for ``"test"``, each a
    dict with ``b'data'`` (N, 3072) uint8 in R, G, B planes and ``b'labels'``) under
    ``root/cifar-10-batches-py`` or ``root``; then ``root/cifar10_<split>.npz`` or
    ``root/cifar10.npz``. ``root`` may also be a ``.npz`` file. Pickles are read with an
    unpickler that only rebuilds arrays. Nothing is downloaded: a missing file raises
    ``FileNotFoundError`` with how to get it.
    """
    return _load_local(
        root, split, dtype, "CIFAR-10", "cifar10", _CIFAR_HOWTO, _cifar_batch_files, _cifar_expected
    )


def get_image_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "train",
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Load image set ``name`` (``digits``, ``mnist``, ``cifar10``) and check its shape.

    ``digits`` ignores ``root`` (bundled with scikit-learn); ``mnist`` and ``cifar10`` need it.
    Returns ``(images (N, *IMAGE_SHAPES[name]) in [-1, 1], labels (N,) int64)``.
    """
    shape = image_shape(name)
    if name == "digits":
        images, labels = load_digits(split, dtype)
    elif name == "mnist":
        images, labels = load_mnist(root, split, dtype)
    else:
        images, labels = load_cifar10(root, split, dtype)
    check_image_shape(images, shape, name)
    return images, labels


# ------------------------------------------------------------------------------------------------
# minibatches
# ------------------------------------------------------------------------------------------------


def _check_rows(tensor: Tensor, batch_size: int) -> int:
    if not torch.is_tensor(tensor):
        raise bad("type(tensor)", type(tensor).__name__, "pass a torch.Tensor (N, *dims)")
    if tensor.dim() == 0 or tensor.shape[0] == 0:
        raise bad(
            "tensor.shape",
            tuple(tensor.shape),
            "it is empty: use a leading batch dimension of at least one row",
        )
    n = tensor.shape[0]
    integer(batch_size, "batch_size", lo=1, fix="use a positive integer")
    if batch_size > n:
        raise bad(
            "batch_size",
            batch_size,
            f"it exceeds the {n} rows of tensor: draws are without replacement, lower batch_size",
        )
    return n


def sample_batch(
    tensor: Tensor, batch_size: int, generator: torch.Generator | None = None
) -> Tensor:
    """``batch_size`` distinct rows of ``tensor`` (``(N, *dims)`` -> ``(batch_size, *dims)``)."""
    n = _check_rows(tensor, batch_size)
    idx = torch.randperm(n, generator=generator)[:batch_size]
    return tensor[idx.to(tensor.device)]


class TensorSampler:
    """Minibatches of the rows of ``tensor`` without replacement within an epoch.

    At construction one 63-bit seed is drawn from ``generator`` (the only use of it); epoch ``e``
    visits the rows in the order ``torch.randperm(N)`` seeded by ``seed + e``. ``sample(B)``
    returns the next ``B`` rows of the current order; when fewer than ``B`` remain, the left-over
    rows are skipped and the next epoch starts (as ``drop_last``), so every batch holds distinct
    rows and no row repeats within an epoch. The state is ``(seed, epoch, cursor)``:
    ``state_dict()`` / ``load_state_dict()`` resume the exact sequence of batches.
    """

    def __init__(self, tensor: Tensor, generator: torch.Generator | None = None) -> None:
        _check_rows(tensor, 1)
        self.tensor = tensor
        self.n = int(tensor.shape[0])
        self.seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        self.epoch = 0
        self.cursor = 0
        self._perm: Tensor | None = None

    def _order(self) -> Tensor:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._perm = torch.randperm(self.n, generator=g)
        return self._perm

    def sample_indices(self, batch_size: int) -> Tensor:
        """Indices ``(batch_size,)`` of the next batch (long, on CPU)."""
        _check_rows(self.tensor, batch_size)
        if self.cursor + batch_size > self.n:
            self.epoch += 1
            self.cursor = 0
            self._perm = None
        idx = self._order()[self.cursor : self.cursor + batch_size]
        self.cursor += batch_size
        return idx

    def sample(self, batch_size: int) -> Tensor:
        """The next batch ``(batch_size, *dims)`` of rows of ``tensor``."""
        idx = self.sample_indices(batch_size)
        return self.tensor[idx.to(self.tensor.device)]

    def state_dict(self) -> dict[str, int]:
        """``{"n", "seed", "epoch", "cursor"}``: all plain ints (JSON- and checkpoint-friendly)."""
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a state from :meth:`state_dict`; the tensor must have the same number of rows."""
        keys = ("n", "seed", "epoch", "cursor")
        if not isinstance(state, dict) or any(k not in state for k in keys):
            raise bad("state", state, f"pass a dict with keys {list(keys)} (from state_dict())")
        n, seed, epoch, cursor = (int(state[k]) for k in keys)
        if n != self.n:
            raise bad(
                "state['n']",
                n,
                f"the state was saved for a tensor of {n} rows, this sampler has {self.n}: "
                "resume with the same data",
            )
        if epoch < 0 or not 0 <= cursor <= n or not 0 <= seed < 2**62:
            raise bad(
                "state",
                state,
                "use epoch >= 0, 0 <= cursor <= n and 0 <= seed < 2**62 (from state_dict())",
            )
        self.seed, self.epoch, self.cursor = seed, epoch, cursor
        self._perm = None
