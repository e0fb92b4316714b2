"""Tests of gcflows.data: presets, the digits split, the on-disk formats, the minibatch sampler."""

from __future__ import annotations

import gzip
import json
import pickle
import struct

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gcflows import data
from gcflows.data import (
    IMAGE_SHAPES,
    TensorSampler,
    check_image_shape,
    get_image_dataset,
    image_shape,
    load_cifar10,
    load_digits,
    load_mnist,
    load_npz_images,
    read_idx,
    sample_batch,
)

# ------------------------------------------------------------------------------------------------
# Gaussian-mixture presets (built by gcflows.gmm)
# ------------------------------------------------------------------------------------------------


def test_get_preset_passes_keyword_arguments_and_names_the_choices():
    from gcflows import gmm

    a = gmm.get_preset("random_mixture", dim=5, n_components=3, generator=11)
    b = gmm.random_mixture(5, 3, generator=11)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    torch.testing.assert_close(a.sample(10, generator=g1), b.sample(10, generator=g2))
    assert a.sample(1).shape == (1, 5)
    with pytest.raises(ValueError, match="name must be one of"):
        gmm.get_preset("nine_gaussians")


# ------------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------------


def test_digits_values_are_sklearn_pixels_mapped_to_minus1_1():
    from sklearn.datasets import load_digits as sk_load

    bunch = sk_load()
    x, y = load_digits("all", dtype=torch.float64)
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float64 and y.dtype == torch.int64
    raw = torch.from_numpy(bunch.images)
    torch.testing.assert_close(x[:, 0], raw / 8 - 1, rtol=0, atol=0)
    # Range exactly [-1, 1] (pixels 0 and 16 both occur) and values on the 17-level grid.
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    levels = (x + 1) * 8
    assert bool((levels == levels.round()).all())
    assert torch.equal(y, torch.from_numpy(bunch.target).long())


def test_digits_split_is_deterministic_stratified_and_partitions_the_set():
    torch.manual_seed(0)
    np.random.seed(0)
    xtr, ytr = load_digits("train")
    torch.manual_seed(1)
    np.random.seed(1)
    xtr2, ytr2 = load_digits("train")
    assert torch.equal(xtr, xtr2) and torch.equal(ytr, ytr2)  # independent of global RNG state
    xte, yte = load_digits("test")
    assert xtr.dtype == torch.float32 and xtr.shape[1:] == (1, 8, 8)
    assert xtr.shape[0] + xte.shape[0] == 1797
    for x in (xtr, xte):
        assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    # Partition: train and test indices are disjoint and cover 0..1796.
    tr, te = data._digits_split_indices()
    assert np.intersect1d(tr, te).size == 0
    assert np.array_equal(np.sort(np.concatenate([tr, te])), np.arange(1797))
    xall, yall = load_digits("all")
    assert torch.equal(xall[torch.from_numpy(te)], xte) and torch.equal(
        yall[torch.from_numpy(tr)], ytr
    )
    # Stratified: every label 0..9 in both splits, each class holding round(0.2 n_c) test images.
    counts_all = torch.bincount(yall, minlength=10)
    counts_te = torch.bincount(yte, minlength=10)
    assert bool((counts_te > 0).all()) and bool((torch.bincount(ytr, minlength=10) > 0).all())
    expected = torch.round(data.DIGITS_TEST_FRACTION * counts_all.double()).long()
    assert torch.equal(counts_te, expected)


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="split='validation' is invalid: use one of"):
        load_digits("validation")
    with pytest.raises(ValueError, match="dtype=torch.int64 is invalid: use a floating"):
        load_digits("train", dtype=torch.int64)


# ------------------------------------------------------------------------------------------------
# MNIST: idx files written in the real format
# ------------------------------------------------------------------------------------------------


def _write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    """idx: 0x00 0x00, type 0x08 (uint8), ndim, big-endian int32 dims, then the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _fake_mnist(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    return images, rng.integers(0, 10, size=n, dtype=np.uint8)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("layout", ["MNIST/raw", "."])
def test_mnist_reads_idx_files(tmp_path, compress, layout):
    folder = tmp_path / layout
    folder.mkdir(parents=True, exist_ok=True)
    tr_img, tr_lbl = _fake_mnist(7, 0)
    te_img, te_lbl = _fake_mnist(3, 1)
    _write_idx(folder / "train-images-idx3-ubyte", tr_img, compress)
    _write_idx(folder / "train-labels-idx1-ubyte", tr_lbl, compress)
    _write_idx(folder / "t10k-images-idx3-ubyte", te_img, compress)
    _write_idx(folder / "t10k-labels-idx1-ubyte", te_lbl, compress)

    x, y = load_mnist(tmp_path, "train", dtype=torch.float64)
    assert x.shape == (7, 1, 28, 28)
    torch.testing.assert_close(x[:, 0], torch.from_numpy(tr_img / 127.5 - 1.0), rtol=0, atol=0)
    assert float(x[0, 0, 0, 0]) == -1.0 and float(x[0, 0, 0, 1]) == 1.0
    assert torch.equal(y, torch.from_numpy(tr_lbl.astype(np.int64)))
    xt, yt = load_mnist(tmp_path, "test")
    assert xt.shape == (3, 1, 28, 28) and torch.equal(yt, torch.from_numpy(te_lbl).long())
    xa, ya = get_image_dataset("mnist", tmp_path, split="all")
    assert torch.equal(xa, torch.cat([x.float(), xt])) and torch.equal(ya, torch.cat([y, yt]))


def test_read_idx_rejects_corrupt_files(tmp_path):
    good = np.arange(12, dtype=np.uint8).reshape(3, 2, 2)
    _write_idx(tmp_path / "ok", good)
    assert np.array_equal(read_idx(tmp_path / "ok"), good)
    raw = (tmp_path / "ok").read_bytes()
    (tmp_path / "magic").write_bytes(b"\x01\x00" + raw[2:])
    with pytest.raises(ValueError, match="magic number"):
        read_idx(tmp_path / "magic")
    (tmp_path / "short").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="announces shape"):
        read_idx(tmp_path / "short")


def test_mnist_missing_folder_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_mnist(tmp_path / "nowhere")
    msg = str(err.value)
    assert "does not exist" in msg and "torchvision" in msg and "never downloads" in msg
    # Folder present but empty: names the expected files and where they were looked for.
    with pytest.raises(FileNotFoundError) as err:
        load_mnist(tmp_path, "test")
    msg = str(err.value)
    assert "t10k-images-idx3-ubyte" in msg and str(tmp_path / "MNIST" / "raw") in msg
    assert "mnist_test.npz" in msg and "download=True" in msg
    with pytest.raises(ValueError, match="root=None is invalid: pass the folder holding the"):
        get_image_dataset("mnist")


# ------------------------------------------------------------------------------------------------
# CIFAR-10: python pickle batches written in the real format
# ------------------------------------------------------------------------------------------------


def _write_cifar_batch(path, n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    flat = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    # Protocol 2 with bytes keys, like the original Python 2 files read with encoding="bytes".
    batch = {b"batch_label": b"testing batch", b"data": flat, b"labels": labels}
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return flat, labels


def _fake_cifar(root, sizes=(2, 3, 1, 2, 2), n_test=3):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train = [_write_cifar_batch(folder / f"data_batch_{i + 1}", n, i) for i, n in enumerate(sizes)]
    test = _write_cifar_batch(folder / "test_batch", n_test, 99)
    return train, test


def test_cifar10_reads_pickle_batches(tmp_path):
    train, test = _fake_cifar(tmp_path)
    x, y = load_cifar10(tmp_path, "train", dtype=torch.float64)
    flat = np.concatenate([b[0] for b in train])
    assert x.shape == (10, 3, 32, 32)
    # Row layout: 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    n, c, i, j = 4, 2, 5, 17
    assert float(x[n, c, i, j]) == flat[n, c * 1024 + i * 32 + j] / 127.5 - 1.0
    torch.testing.assert_close(
        x.reshape(10, -1), torch.from_numpy(flat / 127.5 - 1.0), rtol=0, atol=0
    )
    assert y.tolist() == sum((b[1] for b in train), [])
    xt, yt = get_image_dataset("cifar10", tmp_path, split="test")
    assert xt.shape == (3, 3, 32, 32) and yt.tolist() == test[1]


def test_cifar10_refuses_code_in_pickles(tmp_path):
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(ValueError, match="refusing to load"):
        load_cifar10(tmp_path, "test")
    assert not marker.exists()


def test_cifar10_missing_or_incomplete(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_cifar10(tmp_path)
    msg = str(err.value)
    assert "data_batch_1" in msg and "cifar-10-batches-py" in msg and "CIFAR10(" in msg
    assert "cifar.html" in msg and "never downloads" in msg
    _fake_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing \['data_batch_3'\]"):
        load_cifar10(tmp_path)


# ------------------------------------------------------------------------------------------------
# .npz
# ------------------------------------------------------------------------------------------------


def test_npz_uint8_nhwc_and_float_images(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1])
    np.savez(tmp_path / "cifar10_train.npz", images=img, labels=labels)
    x, y = load_cifar10(tmp_path, dtype=torch.float64)
    expected = torch.from_numpy(img.transpose(0, 3, 1, 2) / 127.5 - 1.0)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    assert y.tolist() == labels.tolist()
    # Float pixels in [0, 1] map by 2x - 1 (same images as above, up to float64 round-off).
    np.savez(tmp_path / "f.npz", images=img / 255.0, labels=labels)
    xf, _ = load_npz_images(tmp_path / "f.npz", dtype=torch.float64)
    torch.testing.assert_close(xf, expected, rtol=0, atol=1e-14)
    np.savez(tmp_path / "bad.npz", images=img * 1.0, labels=labels)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        load_npz_images(tmp_path / "bad.npz")


def test_npz_single_split_and_keras_layout(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "one.npz", images=img, labels=np.arange(5))
    x, _ = load_mnist(tmp_path / "one.npz")
    assert x.shape == (5, 1, 28, 28)
    with pytest.raises(ValueError, match="split='test' is invalid: .* holds a single split"):
        load_mnist(tmp_path / "one.npz", split="test")
    np.savez(
        tmp_path / "mnist.npz",
        x_train=img[:3],
        y_train=np.arange(3),
        x_test=img[3:],
        y_test=np.arange(3, 5),
    )
    xt, yt = load_mnist(tmp_path, "test")
    torch.testing.assert_close(xt[:, 0], torch.from_numpy(img[3:] / 127.5 - 1.0).float())
    assert yt.tolist() == [3, 4]
    xa, ya = load_mnist(tmp_path / "mnist.npz", "all")
    assert xa.shape[0] == 5 and ya.tolist() == list(range(5))
    np.savez(tmp_path / "wrong.npz", pixels=img)
    with pytest.raises(ValueError, match="must hold arrays 'images' and 'labels'"):
        load_npz_images(tmp_path / "wrong.npz")
    np.savez(tmp_path / "lbl.npz", images=img, labels=np.arange(4))
    with pytest.raises(ValueError, match=r"labels .* must have shape \(5,\)"):
        load_npz_images(tmp_path / "lbl.npz")


def test_npz_train_and_test_files_in_one_folder_serve_their_own_split(tmp_path):
    rng = np.random.default_rng(2)
    train = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    test = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "cifar10_train.npz", images=train, labels=np.arange(6) % 10)
    np.savez(tmp_path / "cifar10_test.npz", images=test, labels=np.array([7, 8, 9]))
    xtr, _ = load_cifar10(tmp_path, "train", dtype=torch.float64)
    xte, yte = load_cifar10(tmp_path, "test", dtype=torch.float64)
    torch.testing.assert_close(xte, torch.from_numpy(test.transpose(0, 3, 1, 2) / 127.5 - 1.0))
    assert xtr.shape[0] == 6 and yte.tolist() == [7, 8, 9]
    # A test file never serves as training data, nor a training file as the test reference.
    with pytest.raises(ValueError, match="single split"):
        load_npz_images(tmp_path / "cifar10_test.npz", "train")
    with pytest.raises(ValueError, match="single split"):
        load_npz_images(tmp_path / "cifar10_train.npz", "test")


def test_wrong_image_size_for_the_preset_names_it(tmp_path):
    np.savez(
        tmp_path / "mnist_train.npz",
        images=np.zeros((2, 8, 8), np.uint8),
        labels=np.zeros(2, dtype=np.int64),
    )
    with pytest.raises(ValueError, match=r"images.shape=\(.*\) is invalid: preset 'mnist' expects"):
        get_image_dataset("mnist", tmp_path)
    x, _ = get_image_dataset("digits")
    assert x.shape[1:] == image_shape("digits") == IMAGE_SHAPES["digits"]
    with pytest.raises(ValueError, match="preset 'cifar10_base'"):
        check_image_shape(x, image_shape("cifar10"), "cifar10_base")
    with pytest.raises(ValueError, match="name='imagenet' is invalid: use one of"):
        image_shape("imagenet")


# ------------------------------------------------------------------------------------------------
# minibatches
# ------------------------------------------------------------------------------------------------


def _draw(sampler: TensorSampler, sizes) -> list[list[int]]:
    return [sampler.sample(b)[:, 0].long().tolist() for b in sizes]


@given(n=st.integers(1, 40), b=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_sampler_no_repeats_within_an_epoch(n, b, seed):
    b = min(b, n)
    rows = torch.arange(n).double()[:, None]
    sampler = TensorSampler(rows, torch.Generator().manual_seed(seed))
    per_epoch = n // b
    batches = _draw(sampler, [b] * (3 * per_epoch))
    for e in range(3):
        epoch = sum(batches[e * per_epoch : (e + 1) * per_epoch], [])
        assert len(set(epoch)) == len(epoch) == per_epoch * b  # distinct rows, drop_last
    assert sampler.epoch == 2


def test_sampler_is_deterministic_and_resumes_exactly():
    rows = torch.arange(23).double()[:, None]
    sizes = [5, 5, 4, 7, 5, 5, 3, 6, 5, 5, 5, 2]
    full = _draw(TensorSampler(rows, torch.Generator().manual_seed(0)), sizes)
    assert full == _draw(TensorSampler(rows, torch.Generator().manual_seed(0)), sizes)
    assert full != _draw(TensorSampler(rows, torch.Generator().manual_seed(1)), sizes)
    # Each epoch is a fresh shuffle: with 23 rows and batches of 23, two epochs differ in order.
    epochs = _draw(TensorSampler(rows, torch.Generator().manual_seed(0)), [23, 23])
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(23)) and epochs[0] != epochs[1]

    first = TensorSampler(rows, torch.Generator().manual_seed(0))
    head = _draw(first, sizes[:5])
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = TensorSampler(rows, torch.Generator().manual_seed(123))  # another seed: overwritten
    resumed.load_state_dict(state)
    assert head + _draw(resumed, sizes[5:]) == full


def test_sampler_touches_no_global_rng_and_bad_input():
    before = torch.random.get_rng_state()
    s = TensorSampler(torch.zeros(6, 2), torch.Generator().manual_seed(0))
    s.sample(3)
    assert torch.equal(before, torch.random.get_rng_state())
    with pytest.raises(ValueError, match="batch_size=.* is invalid: it exceeds the 6 rows"):
        s.sample(7)
    with pytest.raises(ValueError, match="batch_size=0 is invalid: use a positive integer"):
        s.sample(0)
    saved_for_5 = r"state\['n'\]=5 is invalid: .* saved for a tensor of 5 rows"
    with pytest.raises(ValueError, match=saved_for_5):
        s.load_state_dict({"n": 5, "seed": 1, "epoch": 0, "cursor": 0})
    with pytest.raises(ValueError, match="state=.* is invalid: pass a dict with keys"):
        s.load_state_dict({"n": 6})
    with pytest.raises(ValueError, match=r"tensor.shape=\(0, 2\) is invalid: it is empty"):
        TensorSampler(torch.zeros(0, 2))


def test_sample_batch_distinct_and_deterministic():
    rows = torch.arange(30).double()[:, None]
    a = sample_batch(rows, 12, torch.Generator().manual_seed(4))
    assert torch.equal(a, sample_batch(rows, 12, torch.Generator().manual_seed(4)))
    assert len(set(a[:, 0].tolist())) == 12
    with pytest.raises(ValueError, match="without replacement"):
        sample_batch(rows, 31)
