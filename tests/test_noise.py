"""Label-noise generation: exact method-2 counts, maps, determinism, label files, parsing."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import zipfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from jal_search.errors import UserError
from jal_search.noise import (
    NOISE_TYPES,
    NoiseSetting,
    corrupt_labels,
    label_hash,
    parse_noise_setting,
    realised_matrix,
    realised_rate,
    transition_matrix,
)

CIFAR10_MAP = {9: 1, 2: 0, 3: 5, 5: 3, 4: 7}
MNIST_MAP = {7: 1, 2: 7, 5: 6, 6: 5, 3: 8}


def balanced(num_classes: int, per_class: int, seed: int = 0) -> np.ndarray:
    """Shuffled labels with `per_class` samples of each class (train order is not sorted)."""
    labels = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(seed).permutation(labels)


def flip_counts(clean: np.ndarray, noisy: np.ndarray, k: int) -> np.ndarray:
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (clean, noisy), 1)
    return counts


def exact_floor(probability: Fraction, n: int) -> int:
    return (probability * n).numerator // (probability * n).denominator


def expected_symmetric_counts(rate: str, sizes: list[int]) -> np.ndarray:
    """floor(η/(K−1)·n_r) off the diagonal, computed in exact rational arithmetic."""
    k = len(sizes)
    off = Fraction(rate) / (k - 1)
    counts = np.array([[exact_floor(off, n) for _ in range(k)] for n in sizes])
    np.fill_diagonal(counts, 0)
    np.fill_diagonal(counts, np.array(sizes) - counts.sum(axis=1))
    return counts


def expected_map_counts(mapping: dict[int, int], rate: str, sizes: list[int]) -> np.ndarray:
    counts = np.diag(sizes).astype(np.int64)
    for source, target in mapping.items():
        moved = exact_floor(Fraction(rate), sizes[source])
        counts[source, source] -= moved
        counts[source, target] += moved
    return counts


# --- symmetric --------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", ["0.2", "0.4", "0.6", "0.8"])
def test_symmetric_cifar10_sized_counts_are_exact(rate: str) -> None:
    clean = balanced(10, 5000)
    noisy = corrupt_labels(clean, "symmetric", float(rate), 10, seed=1)
    expected = expected_symmetric_counts(rate, [5000] * 10)
    assert np.array_equal(flip_counts(clean, noisy, 10), expected)
    # SPEC §4.1 measured 19.98 / 39.96 / 59.94 / 79.92 %.
    wrong = 10 * 9 * exact_floor(Fraction(rate) / 9, 5000)
    assert realised_rate(clean, noisy) == wrong / 50000
    assert realised_rate(clean, noisy) == pytest.approx(float(rate) * 0.999)


def test_symmetric_unbalanced_counts_and_never_true_class() -> None:
    sizes = [37, 100, 5, 250, 1, 0, 999]
    clean = np.random.default_rng(3).permutation(np.repeat(np.arange(7), sizes))
    noisy = corrupt_labels(clean, "symmetric", 0.6, 7, seed=2)
    assert np.array_equal(flip_counts(clean, noisy, 7), expected_symmetric_counts("0.6", sizes))


def test_symmetric_cifar100_sized_counts() -> None:
    clean = balanced(100, 500)
    noisy = corrupt_labels(clean, "symmetric", 0.4, 100, seed=0)
    counts = flip_counts(clean, noisy, 100)
    off = counts[~np.eye(100, dtype=bool)]
    assert (off == 2).all()  # floor(0.4/99·500) = 2 per wrong target (SPEC: 39.6%)
    assert realised_rate(clean, noisy) == pytest.approx(0.396)


def test_symmetric_matrix_formula() -> None:
    matrix = transition_matrix("symmetric", 0.3, 4)
    assert np.allclose(np.diag(matrix), 0.7)
    assert np.allclose(matrix[~np.eye(4, dtype=bool)], 0.1)
    assert np.allclose(matrix.sum(axis=1), 1.0)


# --- asymmetric maps ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "mapping"),
    [
        ("cifar10", CIFAR10_MAP),
        ("mnist", MNIST_MAP),
        ("fashion_mnist", MNIST_MAP),
        ("Fashion-MNIST", MNIST_MAP),
        ("kmnist", MNIST_MAP),
        ("digits", MNIST_MAP),
    ],
)
def test_asymmetric_ten_class_maps(dataset: str, mapping: dict[int, int]) -> None:
    sizes = [500 + 37 * c for c in range(10)]
    clean = np.random.default_rng(5).permutation(np.repeat(np.arange(10), sizes))
    noisy = corrupt_labels(clean, "asymmetric", 0.3, 10, seed=4, dataset=dataset)
    assert np.array_equal(flip_counts(clean, noisy, 10), expected_map_counts(mapping, "0.3", sizes))
    changed = noisy != clean
    assert set(np.unique(clean[changed])) == set(mapping)
    assert all(noisy[i] == mapping[clean[i]] for i in np.flatnonzero(changed))


def test_asymmetric_cifar10_overall_rate_is_half() -> None:
    clean = balanced(10, 5000)
    for rate in (0.1, 0.2, 0.3, 0.4):
        noisy = corrupt_labels(clean, "asymmetric", rate, 10, seed=0, dataset="cifar10")
        assert realised_rate(clean, noisy) == pytest.approx(rate / 2)  # SPEC: 5/10/15/20 %


def test_asymmetric_cifar100_blocks_give_exact_rate() -> None:
    clean = balanced(100, 500)
    mapping = {j: 5 * (j // 5) + (j + 1) % 5 for j in range(100)}
    assert mapping[4] == 0 and mapping[99] == 95 and mapping[7] == 8
    for rate in ("0.1", "0.2", "0.3", "0.4"):
        noisy = corrupt_labels(clean, "asymmetric", float(rate), 100, seed=0, dataset="cifar100")
        counts = flip_counts(clean, noisy, 100)
        assert np.array_equal(counts, expected_map_counts(mapping, rate, [500] * 100))
        assert realised_rate(clean, noisy) == float(rate)


@pytest.mark.parametrize("dataset", [None, "svhn"])
def test_asymmetric_default_is_pair_flip(dataset: str | None) -> None:
    sizes = [40, 7, 100, 3, 0]
    clean = np.repeat(np.arange(5), sizes)
    noisy = corrupt_labels(clean, "asymmetric", 0.5, 5, seed=9, dataset=dataset)
    mapping = {i: (i + 1) % 5 for i in range(5)}
    assert np.array_equal(flip_counts(clean, noisy, 5), expected_map_counts(mapping, "0.5", sizes))


def test_asymmetric_matrix_rows() -> None:
    matrix = transition_matrix("asymmetric", 0.2, 10, "cifar10")
    assert np.allclose(matrix.sum(axis=1), 1.0)
    for c in range(10):
        if c in CIFAR10_MAP:
            assert matrix[c, c] == pytest.approx(0.8)
            assert matrix[c, CIFAR10_MAP[c]] == pytest.approx(0.2)
        else:
            assert np.array_equal(matrix[c], np.eye(10)[c])


def test_asymmetric_map_needs_matching_class_count() -> None:
    with pytest.raises(UserError, match="cifar10 asymmetric map needs 10 classes"):
        transition_matrix("asymmetric", 0.2, 5, "cifar10")
    with pytest.raises(UserError, match="cifar100 asymmetric map needs 100 classes"):
        corrupt_labels([0, 1], "asymmetric", 0.2, 10, seed=0, dataset="cifar100")


def test_float_products_round_to_the_exact_count() -> None:
    # 0.29 * 100 == 28.999999999999996 in floating point; the exact count is 29.
    clean = np.repeat([0, 1], 100)
    noisy = corrupt_labels(clean, "asymmetric", 0.29, 2, seed=0)
    assert realised_rate(clean, noisy) == 0.29


# --- custom matrices ----------------------------------------------------------------------------


def test_custom_matrix_counts() -> None:
    matrix = np.array([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0], [0.1, 0.3, 0.6]])
    sizes = [400, 123, 77]
    clean = np.random.default_rng(0).permutation(np.repeat(np.arange(3), sizes))
    noisy = corrupt_labels(clean, "custom", "mine", 3, seed=1, matrix=matrix)
    expected = np.array([[200, 100, 100], [0, 123, 0], [7, 23, 47]])  # floor(T·n_r)
    assert np.array_equal(flip_counts(clean, noisy, 3), expected)


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        (np.eye(3)[:2], r"expected shape \(3, 3\)"),
        (np.eye(2), r"expected shape \(3, 3\)"),
        (np.array([[1.2, -0.2, 0], [0, 1, 0], [0, 0, 1]]), "non-negative"),
        (np.array([[0.5, 0.4, 0], [0, 1, 0], [0, 0, 1]]), "row 0 sums to 0.9"),
        (None, "custom noise needs a K×K row-stochastic matrix"),
        ([["a", "b", "c"]] * 3, "matrix: expected a numeric array"),
    ],
)
def test_custom_matrix_validation(matrix: object, message: str) -> None:
    with pytest.raises(UserError, match=message):
        corrupt_labels([0, 1, 2], "custom", "m", 3, seed=0, matrix=matrix)


def test_matrix_only_for_custom() -> None:
    with pytest.raises(UserError, match="only custom noise uses a matrix"):
        corrupt_labels([0, 1], "symmetric", 0.2, 2, seed=0, matrix=np.eye(2))


# --- determinism, RNG hygiene, diagnostics ------------------------------------------------------


@pytest.mark.parametrize(
    ("noise_type", "rate", "dataset"),
    [("symmetric", 0.4, None), ("asymmetric", 0.3, "cifar10"), ("dependent", 0.4, None)],
)
def test_same_seed_same_labels_other_seed_differs(
    noise_type: str, rate: float, dataset: str | None
) -> None:
    clean = balanced(10, 200)
    features = np.random.default_rng(0).standard_normal((clean.size, 8))

    def run(seed: int) -> np.ndarray:
        return corrupt_labels(clean, noise_type, rate, 10, seed, dataset, features=features)

    assert np.array_equal(run(7), run(7))
    assert not np.array_equal(run(7), run(8))


def test_no_global_random_state_is_used() -> None:
    np.random.seed(1234)
    random.seed(1234)
    numpy_state, python_state = np.random.get_state(), random.getstate()
    clean = balanced(10, 100)
    features = np.ones((clean.size, 4)) * np.arange(clean.size)[:, None] / clean.size
    corrupt_labels(clean, "symmetric", 0.4, 10, seed=0)
    corrupt_labels(clean, "asymmetric", 0.4, 10, seed=0, dataset="mnist")
    corrupt_labels(clean, "dependent", 0.4, 10, seed=0, features=features)
    corrupt_labels(clean, "custom", "u", 10, seed=0, matrix=np.full((10, 10), 0.1))
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1])
    assert after[2:] == numpy_state[2:]
    assert random.getstate() == python_state


def test_input_is_not_modified_and_clean_copies() -> None:
    clean = balanced(4, 50)
    original = clean.copy()
    noisy = corrupt_labels(clean, "symmetric", 0.5, 4, seed=0)
    assert np.array_equal(clean, original)
    copy = corrupt_labels(clean.tolist(), "clean", 0.0, 4, seed=0)
    assert copy.dtype == np.int64 and np.array_equal(copy, clean)
    assert noisy.dtype == np.int64 and noisy.shape == clean.shape


def test_realised_matrix_close_to_transition_matrix() -> None:
    clean = balanced(10, 5000)
    matrix = transition_matrix("symmetric", 0.4, 10)
    noisy = corrupt_labels(clean, "symmetric", 0.4, 10, seed=3)
    realised = realised_matrix(clean, noisy, 10)
    assert np.allclose(realised.sum(axis=1), 1.0)
    # Each off-diagonal floor loses < 1 sample; the diagonal keeps the K−1 losses of its row.
    off = ~np.eye(10, dtype=bool)
    assert np.abs(realised - matrix)[off].max() < 1 / 5000
    assert np.abs(realised - matrix)[~off].max() < 9 / 5000


def test_realised_matrix_empty_class_and_rate() -> None:
    clean = np.array([0, 0, 0, 0, 2, 2])
    noisy = np.array([0, 1, 1, 2, 2, 0])
    realised = realised_matrix(clean, noisy, 3)
    assert np.allclose(realised, [[0.25, 0.5, 0.25], [0, 1, 0], [0.5, 0, 0.5]])
    assert realised_rate(clean, noisy) == pytest.approx(4 / 6)
    with pytest.raises(UserError, match="must align"):
        realised_rate([0, 1], [0])


def test_label_hash_is_stable_across_dtypes() -> None:
    labels = [3, 0, 9, 9, 1, 2**40]
    expected = hashlib.sha256(struct.pack("<6q", *labels)).hexdigest()[:16]
    assert label_hash(np.array(labels, dtype=np.int64)) == expected
    small = labels[:-1]
    assert label_hash(np.array(small, dtype=np.int32).tolist()) == label_hash(
        np.array(small, dtype=np.int64)
    )
    assert label_hash(np.array(small, dtype=">i4")) == label_hash(small)
    changed = list(small)
    changed[2] = 8
    assert label_hash(changed) != label_hash(small)
    with pytest.raises(UserError, match="integer class indices"):
        label_hash([0.5, 1.0])


# --- instance-dependent noise -------------------------------------------------------------------


def test_dependent_exact_count_and_always_wrong() -> None:
    clean = balanced(5, 400)
    features = np.random.default_rng(1).standard_normal((clean.size, 20))
    noisy = corrupt_labels(clean, "dependent", 0.3, 5, seed=2, features=features)
    assert np.count_nonzero(noisy != clean) == int(0.3 * clean.size) == 600
    assert set(np.unique(noisy)) <= set(range(5))


def test_dependent_wrong_class_depends_on_features() -> None:
    clean = balanced(5, 400)
    rng = np.random.default_rng(1)
    features_a = rng.standard_normal((clean.size, 20))
    features_b = rng.standard_normal((clean.size, 20))
    noisy_a = corrupt_labels(clean, "dependent", 0.5, 5, seed=2, features=features_a)
    noisy_b = corrupt_labels(clean, "dependent", 0.5, 5, seed=2, features=features_b)
    # Which samples flip comes from the seed alone; where they go depends on the images.
    assert np.array_equal(noisy_a != clean, noisy_b != clean)
    assert np.count_nonzero(noisy_a != noisy_b) > 100


def test_dependent_scores_are_linear_in_features() -> None:
    # With huge features the softmax becomes an argmax of x @ W[y]: samples of one class that
    # share a feature vector get the same wrong label, and its negation the argmin (another one).
    k, per_class = 6, 300
    clean = balanced(k, per_class)
    direction = np.random.default_rng(4).standard_normal(16)
    sign = np.where(np.arange(clean.size) % 2 == 0, 1.0, -1.0)
    features = 1e4 * sign[:, None] * direction[None, :]
    noisy = corrupt_labels(clean, "dependent", 0.6, k, seed=0, features=features)
    for c in range(k):
        for s in (1.0, -1.0):
            wrong = noisy[(clean == c) & (sign == s) & (noisy != clean)]
            assert wrong.size > 0 and np.unique(wrong).size == 1
        plus = noisy[(clean == c) & (sign == 1.0) & (noisy != clean)][0]
        minus = noisy[(clean == c) & (sign == -1.0) & (noisy != clean)][0]
        assert plus != minus


def test_dependent_needs_features_or_file() -> None:
    with pytest.raises(UserError, match="features: generated dependent noise needs"):
        corrupt_labels([0, 1, 1], "dependent", 0.4, 2, seed=0)
    with pytest.raises(UserError, match=r"features: expected a numeric \(3, D\) array"):
        corrupt_labels([0, 1, 1], "dependent", 0.4, 2, seed=0, features=np.zeros((2, 4)))


# --- label files --------------------------------------------------------------------------------


def test_dependent_label_file_json_and_npy(tmp_path: Path) -> None:
    clean = balanced(10, 30)
    stored = corrupt_labels(clean, "symmetric", 0.4, 10, seed=0)
    json_file = tmp_path / "cifar10_dependent_0.4.json"
    json_file.write_text(json.dumps(stored.tolist()))
    npy_file = tmp_path / "labels.npy"
    np.save(npy_file, stored.astype(np.int32))
    for path in (json_file, str(npy_file)):
        loaded = corrupt_labels(clean, "dependent", 0.4, 10, seed=99, label_file=path)
        assert loaded.dtype == np.int64 and np.array_equal(loaded, stored)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([0, 1, 2], r"has shape \(3,\); expected a 1-D vector of 4 integer labels"),
        ([0, 1, 2, 10], r"labels span \[0, 10\]; .*in \[0, 10\)"),
        ([0, 1, 2, -1], r"labels span \[-1, 2\]"),
        ([0, 1, 2.5, 3], "has float64 values"),
        ({"a": [0, 1, 2, 3]}, "dependent noise needs one noisy label vector"),
    ],
)
def test_dependent_label_file_validation(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UserError, match=message) as info:
        corrupt_labels([0, 1, 2, 3], "dependent", 0.4, 10, seed=0, label_file=path)
    assert str(path) in str(info.value)


def test_missing_and_unsupported_label_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        corrupt_labels([0, 1], "dependent", 0.4, 2, seed=0, label_file=tmp_path / "x.json")
    other = tmp_path / "labels.csv"
    other.write_text("0,1")
    with pytest.raises(UserError, match="unsupported extension '.csv'"):
        corrupt_labels([0, 1], "dependent", 0.4, 2, seed=0, label_file=other)
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="re-save it with np.savez"):
        corrupt_labels([0, 1], "dependent", 0.4, 2, seed=0, label_file=pickled)
    with pytest.raises(UserError, match="only dependent and human noise read a label file"):
        corrupt_labels([0, 1], "symmetric", 0.4, 2, seed=0, label_file=other)


def human_sets(clean: np.ndarray) -> dict[str, np.ndarray]:
    """A CIFAR-10N-like table of int64 label sets aligned with `clean`."""
    rng = np.random.default_rng(0)
    sets = {"clean_label": clean.astype(np.int64)}
    for key in ("worse_label", "aggre_label", "random_label1", "random_label2", "random_label3"):
        noisy = clean.copy()
        flip = rng.random(clean.size) < 0.3
        noisy[flip] = rng.integers(0, 10, flip.sum())
        sets[key] = noisy.astype(np.int64)
    return sets


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("worst", "worse_label"),
        ("aggre", "aggre_label"),
        ("rand1", "random_label1"),
        ("rand2", "random_label2"),
        ("rand3", "random_label3"),
        ("clean", "clean_label"),
        ("random_label2", "random_label2"),
    ],
)
def test_human_pt_file_written_by_torch_save(tmp_path: Path, name: str, key: str) -> None:
    clean = balanced(10, 20)
    sets = human_sets(clean)
    path = tmp_path / "CIFAR-10_human.pt"
    torch.save(sets, path)
    noisy = corrupt_labels(clean, "human", name, 10, seed=0, label_file=path)
    assert noisy.dtype == np.int64 and np.array_equal(noisy, sets[key])


def test_human_pt_file_from_numpy_1(tmp_path: Path) -> None:
    # The released CIFAR-N files were pickled under numpy 1.x, which names the array
    # reconstructor numpy.core.multiarray._reconstruct; rewrite a numpy-2 file to match.
    clean = balanced(10, 20)
    sets = human_sets(clean)
    modern, legacy = tmp_path / "modern.pt", tmp_path / "legacy.pt"
    torch.save(sets, modern)
    with zipfile.ZipFile(modern) as src, zipfile.ZipFile(legacy, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
            dst.writestr(item.filename, data)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(legacy)
    assert "numpy.core.multiarray._reconstruct" in unsafe
    noisy = corrupt_labels(clean, "human", "worst", 10, seed=0, label_file=legacy)
    assert np.array_equal(noisy, sets["worse_label"])


def test_human_cifar100_names_and_npz(tmp_path: Path) -> None:
    clean = balanced(100, 3)
    noisy_set = np.roll(clean, 1)
    path = tmp_path / "CIFAR-100_human.npz"
    np.savez(path, clean_label=clean, noisy_label=noisy_set)
    for name in ("noisy100", "noisy", "noisy_label"):
        noisy = corrupt_labels(clean, "human", name, 100, seed=0, label_file=path)
        assert np.array_equal(noisy, noisy_set)
    assert np.array_equal(
        corrupt_labels(clean, "human", "clean100", 100, seed=0, label_file=path), clean
    )


def test_human_structured_npy(tmp_path: Path) -> None:
    clean = balanced(10, 5)
    table = np.zeros(clean.size, dtype=[("clean_label", "<i8"), ("worse_label", "<i8")])
    table["clean_label"], table["worse_label"] = clean, (clean + 1) % 10
    path = tmp_path / "human.npy"
    np.save(path, table)
    noisy = corrupt_labels(clean, "human", "worst", 10, seed=0, label_file=path)
    assert np.array_equal(noisy, (clean + 1) % 10)


def test_human_file_errors(tmp_path: Path) -> None:
    clean = balanced(10, 20)
    sets = human_sets(clean)
    path = tmp_path / "h.pt"

    torch.save({**sets, "clean_label": np.roll(clean, 1)}, path)
    with pytest.raises(UserError, match="not aligned with the dataset's train order") as info:
        corrupt_labels(clean, "human", "worst", 10, seed=0, label_file=path)
    assert str(path) in str(info.value)

    torch.save({**sets, "worse_label": sets["worse_label"][:-1]}, path)
    with pytest.raises(UserError, match=r"\[worse_label\]: has shape \(199,\); .* 200 integer"):
        corrupt_labels(clean, "human", "worst", 10, seed=0, label_file=path)

    torch.save({**sets, "worse_label": sets["worse_label"] + 5}, path)
    with pytest.raises(UserError, match=r"labels span \[5, 14\]; .*in \[0, 10\)"):
        corrupt_labels(clean, "human", "worst", 10, seed=0, label_file=path)

    torch.save(sets, path)
    with pytest.raises(UserError, match="label set 'noisy' .* is not in"):
        corrupt_labels(clean, "human", "noisy", 10, seed=0, label_file=path)
    with pytest.raises(UserError, match="human noise needs the CIFAR-N label file"):
        corrupt_labels(clean, "human", "worst", 10, seed=0)


def test_human_pt_refuses_arbitrary_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"worse_label": np.arange(3), "extra": Fraction(1, 2)}, path)
    with pytest.raises(UserError, match=r"weights_only=True\) \(it needs fractions.Fraction\)"):
        corrupt_labels([0, 1, 2], "human", "worst", 3, seed=0, label_file=path)


def test_human_single_vector_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "v.json"
    path.write_text("[0, 1]")
    with pytest.raises(UserError, match="human noise needs named label sets"):
        corrupt_labels([0, 1], "human", "worst", 2, seed=0, label_file=path)


# --- settings and validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "rate", "name"),
    [
        ("symmetric:0.6", "symmetric", 0.6, "symmetric-0.6"),
        ("  SYMMETRIC : 0.4 ", "symmetric", 0.4, "symmetric-0.4"),
        ("symmetric:0", "symmetric", 0.0, "symmetric-0.0"),
        ("asymmetric:1", "asymmetric", 1.0, "asymmetric-1.0"),
        ("dependent:0.2", "dependent", 0.2, "dependent-0.2"),
        ("human:worst", "human", "worst", "human-worst"),
        ("Human:Rand1", "human", "rand1", "human-rand1"),
        ("custom:my_T.v2", "custom", "my_T.v2", "custom-my_T.v2"),
        ("clean", "clean", 0.0, "clean"),
        ("clean:0", "clean", 0.0, "clean"),
    ],
)
def test_parse_noise_setting(text: str, kind: str, rate: float | str, name: str) -> None:
    setting = parse_noise_setting(text)
    assert setting == NoiseSetting(kind, rate)
    assert setting.name == name
    assert type(setting.rate) is type(rate)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("asym:0.2", "unknown 'asym'; use one of clean, symmetric, asymmetric"),
        ("", "expected 'type:rate'"),
        ("symmetric", "symmetric noise needs a value, e.g. 'symmetric:0.4'"),
        ("human:", "human noise needs a value, e.g. 'human:worst'"),
        ("symmetric:abc", "expected a number such as 0.4"),
        ("symmetric:1", r"rate in \[0, 1\), got '1'"),
        ("symmetric:-0.1", r"rate in \[0, 1\)"),
        ("symmetric:nan", "finite number"),
        ("asymmetric:1.01", r"rate in \[0, 1\]"),
        ("dependent:0", r"rate in \(0, 1\)"),
        ("dependent:1", r"rate in \(0, 1\)"),
        ("clean:0.2", "clean noise needs a rate in 0"),
        ("human:../etc", "label-set key such as 'worst'"),
        ("custom:a b", "matrix name"),
    ],
)
def test_parse_noise_setting_rejects(text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_noise_setting(text)


def test_noise_types_and_direct_setting_validation() -> None:
    assert NOISE_TYPES == ("clean", "symmetric", "asymmetric", "dependent", "human", "custom")
    with pytest.raises(UserError, match="rate in"):
        NoiseSetting("symmetric", 1.5)
    with pytest.raises(UserError, match="expected a number"):
        NoiseSetting("symmetric", True)
    with pytest.raises(UserError, match="unknown 'Symmetric'"):
        NoiseSetting("Symmetric", 0.2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": [0, 1, 5]}, r"labels: labels span \[0, 5\]"),
        ({"labels": [[0, 1]]}, "expected a 1-D vector"),
        ({"labels": [0.0, 1.0]}, "has float64 values"),
        ({"num_classes": 1}, "integer >= 2"),
        ({"num_classes": 2.0}, "integer >= 2"),
        ({"seed": -1}, "non-negative integer"),
        ({"seed": 1.5}, "non-negative integer"),
        ({"noise_type": "pairflip"}, "unknown 'pairflip'"),
        ({"rate": 1.0}, r"rate in \[0, 1\)"),
        ({"rate": None}, "expected a number"),
    ],
)
def test_corrupt_labels_validation(kwargs: dict, message: str) -> None:
    call = {"labels": [0, 1, 1], "noise_type": "symmetric", "rate": 0.2, "num_classes": 2}
    call |= {"seed": 0} | kwargs
    with pytest.raises(UserError, match=message):
        corrupt_labels(**call)


def test_transition_matrix_rejects_types_without_one() -> None:
    assert np.array_equal(transition_matrix("clean", 0.0, 3), np.eye(3))
    for kind in ("dependent", "human", "custom"):
        with pytest.raises(UserError, match="no built-in transition matrix"):
            transition_matrix(kind, 0.2, 3)
