"""Tests of gcflows.classifier: deterministic training, the hash-keyed cache, and what the
evaluation helpers compute (Frechet distance on the features, the classification report)."""

from __future__ import annotations

import pytest
import torch

from gcflows import classifier as clf
from gcflows.data import load_digits
from gcflows.metrics import frechet_distance

# A classifier small enough to train in about a second; the determinism and cache tests do not
# depend on its accuracy.
SMALL = {"channels": [4, 8], "feature_dim": 8, "epochs": 1, "batch_size": 128}


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def default_classifier(tmp_path_factory):
    """The default classifier, trained once per session into a session-wide cache folder (the
    same folder as tests/test_images.py uses, so the session trains it once)."""
    cache = tmp_path_factory.getbasetemp() / "gcflows_classifier_cache"
    return clf.load_classifier(cache_dir=cache)


def test_two_trainings_give_identical_weights_and_features():
    m1, info1 = clf.train_classifier(SMALL)
    rng_before = torch.get_rng_state()
    m2, info2 = clf.train_classifier(SMALL)
    assert torch.equal(rng_before, torch.get_rng_state())  # the global RNG is not used
    assert _same_state(m1, m2)
    x, _ = load_digits("test")
    assert torch.equal(clf.classifier_features(m1, x), clf.classifier_features(m2, x))
    assert info1 == info2
    m3, _ = clf.train_classifier({**SMALL, "seed": 1})
    assert not _same_state(m1, m3)  # the seed matters, so the equality above is not vacuous


def test_cache_is_keyed_by_the_config_hash(tmp_path):
    model, info = clf.load_classifier(SMALL, cache_dir=tmp_path)
    path = clf.cache_path(SMALL, tmp_path)
    assert not info["cached"] and path.is_file() and info["path"] == str(path)
    assert path.name == f"digits_classifier_{clf.config_hash(SMALL)[:16]}.pt"
    again, info2 = clf.load_classifier(SMALL, cache_dir=tmp_path)
    assert info2["cached"] and _same_state(model, again)
    # the defaults are filled in before hashing: spelling out a default changes nothing
    assert clf.config_hash(SMALL) == clf.config_hash({**SMALL, "seed": 0})
    assert clf.config_hash(SMALL) != clf.config_hash({**SMALL, "epochs": 2})
    assert clf.cache_path({**SMALL, "epochs": 2}, tmp_path) != path


def test_damaged_or_foreign_cache_files_raise(tmp_path):
    path = clf.cache_path(SMALL, tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="unreadable"):
        clf.load_classifier(SMALL, cache_dir=tmp_path)
    torch.save({"format": clf.CACHE_FORMAT, "hash": "0" * 64, "state_dict": {}}, path)
    with pytest.raises(ValueError, match="does not hold the classifier of this config"):
        clf.load_classifier(SMALL, cache_dir=tmp_path)
    model, info = clf.load_classifier(SMALL, cache_dir=tmp_path, retrain=True)
    assert not info["cached"]
    assert clf.load_classifier(SMALL, cache_dir=tmp_path)[1]["cached"]


@pytest.mark.parametrize(
    "change, match",
    [
        ({"colour": 1}, r"config keys=\['colour'\] is invalid: drop the unknown keys"),
        ({"channels": [4]}, r"config\['channels'\]=\[4\] is invalid"),
        ({"epochs": 0}, r"config\['epochs'\]=0 is invalid: use an integer >= 1"),
        ({"lr": -1.0}, r"config\['lr'\]=-1.0 is invalid: use a finite number > 0"),
        ({"weight_decay": float("nan")}, r"config\['weight_decay'\]=nan is invalid"),
        ({"max_shift": 5}, r"config\['max_shift'\]=5 is invalid: use an integer >= 0 and <= 3"),
        ({"data": {"name": "mnist"}}, r"config\['data'\]=\{'name': 'mnist'\} is invalid"),
    ],
)
def test_bad_config_raises(change, match):
    with pytest.raises(ValueError, match=match):
        clf.config_hash(change)


@pytest.mark.parametrize(
    "images, match",
    [
        (
            torch.zeros(3, 1, 28, 28),
            r"images\.shape=\(3, 1, 28, 28\) is invalid: use shape \(N, 1, 8, 8\)",
        ),
        (torch.zeros(3, 64), r"images.shape=\(3, 64\) is invalid: use shape \(N, 1, 8, 8\)"),
        (torch.full((2, 1, 8, 8), float("nan")), "NaN"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.long), "images.dtype=torch.int64 is invalid"),
    ],
)
def test_bad_images_raise(images, match):
    with pytest.raises(ValueError, match=match):
        clf.check_digit_images(images)


def test_default_classifier_is_accurate_and_its_report_is_consistent(default_classifier):
    model, info = default_classifier
    x, y = load_digits("test")
    # 359 held-out digits; a small CNN reaches ~99 %; 0.97 leaves room for other torch builds
    assert info["test_accuracy"] >= 0.97
    labels = torch.bincount(y, minlength=10).double()
    rep = clf.classification_report(model, x, label_distribution=labels)
    assert rep["classes_covered"] == 10
    assert sum(c["count"] for c in rep["per_class"]) == x.shape[0]
    # predicted class fractions vs the true label fractions: TV <= misclassified share
    assert rep["balance_tv"] <= 1.0 - info["test_accuracy"] + 1e-12
    assert rep["confident_fraction"] >= 0.9
    assert 1.0 <= rep["classifier_score"] <= 10.0


def test_report_of_identical_images_is_one_class_and_score_one(default_classifier):
    model, _ = default_classifier
    x = torch.full((50, 1, 8, 8), -1.0)  # 50 copies of the blank image
    rep = clf.classification_report(model, x)
    assert rep["classes_covered"] == 1
    # all mass on one class against the uniform law: TV = 1/2 (0.9 + 9 * 0.1) = 0.9
    assert rep["balance_tv"] == pytest.approx(0.9, abs=1e-12)
    # p(y|x) equals its average, so the KL is 0 and exp(0) = 1 (float64 round-off only)
    assert rep["classifier_score"] == pytest.approx(1.0, abs=1e-12)


def test_frechet_distance_on_features(default_classifier):
    model, _ = default_classifier
    x, _ = load_digits("test")
    train, _ = load_digits("train")
    same = clf.classifier_frechet_distance(model, x, x)
    assert same == pytest.approx(0.0, abs=1e-6)  # float64 eigen-solve round-off on ~64 features
    fx = clf.classifier_features(model, train)
    fy = clf.classifier_features(model, x)
    assert fx.dtype == torch.float64 and fx.shape == (train.shape[0], model.feature_dim)
    assert clf.classifier_frechet_distance(model, train, x) == frechet_distance(fx, fy)
    noise = torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    # uniform noise is far from digits in feature space, real digits of another split are close
    assert clf.classifier_frechet_distance(model, noise, x) > 10 * frechet_distance(fx, fy)
