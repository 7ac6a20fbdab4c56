"""Label noise for the training set: transition matrices, corruption, and diagnostics.

Conventions (SPEC §4)
---------------------
- A transition matrix ``T`` is K×K with ``T[true, noisy] = P(noisy label | true label)``: rows
  index the *true* class and every row sums to 1 (row-stochastic).
- What ``rate`` (η) means depends on the noise type:

  ``clean``       0; labels are copied.
  ``symmetric``   the fraction of labels moved to a *different* class, spread evenly over the
                  K−1 wrong classes: ``T = (1−η)·I + η/(K−1)·(11ᵀ − I)``. Must be in [0, 1).
  ``asymmetric``  the flip probability of each *source* class of the dataset's map; classes
                  outside the map never flip. For ``cifar10`` and the MNIST-style map only 5 of
                  10 classes flip, so the overall noise is about η/2; for the ``cifar100`` block
                  map and the default pair flip every class flips and the overall noise is ≈ η.
                  In [0, 1].
  ``dependent``   the exact fraction of wrong labels, ``floor(η·N)``; which wrong class a sample
                  gets depends on its image. In (0, 1).
  ``human``       not a rate: the key of the label set in a CIFAR-N file (``worst``, ``aggre``…).
  ``custom``      not a rate: a name for a user-supplied matrix.

- Matrix noise (symmetric, asymmetric, custom) uses SPEC §4.1 "method 2": for each true class r
  and each t ≠ r, exactly ``floor(T[r, t]·n_r)`` samples of class r are relabelled t. Only *which*
  samples flip is random, so the realised rate is a little below η when T·n is not integral
  (CIFAR-10, symmetric 0.2: 19.98%).
- All randomness comes from ``np.random.default_rng(seed)``; never from global random state.
  Upstream draws from the global ``np.random`` stream, so counts match upstream but the chosen
  samples cannot.
"""

from __future__ import annotations

import hashlib
import math
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jal_search.config import parse_json
from jal_search.errors import UserError

NOISE_TYPES = ("clean", "symmetric", "asymmetric", "dependent", "human", "custom")

# Counts are floor(p·n) of exact integers; the slack absorbs float error such as
# 0.29 * 100 == 28.999999999999996, which must count as 29.
_COUNT_SLACK = 1e-9

# Human/custom names end up in file and MLflow run names.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# SPEC §4.1 asymmetric maps as (source, target) pairs.
# CIFAR-10: truck→automobile, bird→airplane, cat↔dog, deer→horse.
_CIFAR10_PAIRS = ((9, 1), (2, 0), (3, 5), (5, 3), (4, 7))
_MNIST_PAIRS = ((7, 1), (2, 7), (5, 6), (6, 5), (3, 8))
_PAIR_MAPS = {
    "cifar10": _CIFAR10_PAIRS,
    "mnist": _MNIST_PAIRS,
    "fashion_mnist": _MNIST_PAIRS,
    "kmnist": _MNIST_PAIRS,
    "digits": _MNIST_PAIRS,
}
_CIFAR100_BLOCK = 5

# Label files hold one small integer per training image (CIFAR-N's .pt: 1 MB; Clothing1M's 1M
# labels as int64: 8 MB). JSON costs ~10 bytes of Python objects per byte once parsed.
MAX_LABEL_FILE_BYTES = 256 << 20  # also the unpacked size of an .npz
MAX_JSON_LABEL_BYTES = 64 << 20

# CLI names of CIFAR-N label sets (SPEC §4.4); any other key is looked up in the file as is.
HUMAN_LABEL_KEYS = {
    "clean": "clean_label",
    "worst": "worse_label",
    "aggre": "aggre_label",
    "rand1": "random_label1",
    "rand2": "random_label2",
    "rand3": "random_label3",
    "clean100": "clean_label",
    "noisy100": "noisy_label",
    "noisy": "noisy_label",
}


@dataclass(frozen=True)
class NoiseSetting:
    """One noise setting. ``rate`` is a float for clean/symmetric/asymmetric/dependent (0.0 for
    clean), the label-set key for human noise and a name for custom noise; validated on creation.
    """

    type: str
    rate: float | str = 0.0

    def __post_init__(self) -> None:
        _check_type(self.type)
        object.__setattr__(self, "rate", _check_rate(self.type, self.rate))

    @property
    def name(self) -> str:
        """A filesystem- and MLflow-safe id: ``clean``, ``symmetric-0.4``, ``human-worst``."""
        if self.type == "clean":
            return "clean"
        value = repr(self.rate) if isinstance(self.rate, float) else self.rate
        return f"{self.type}-{value}"


_EXAMPLES = {
    "symmetric": "symmetric:0.4",
    "asymmetric": "asymmetric:0.2",
    "dependent": "dependent:0.4",
    "human": "human:worst",
    "custom": "custom:my_matrix",
}


def parse_noise_setting(text: str) -> NoiseSetting:
    """Parse ``"type:rate"`` (``"symmetric:0.6"``, ``"human:worst"``) or ``"clean"``.

    The type is case-insensitive and must be one of ``NOISE_TYPES`` spelled out in full.
    """
    if not isinstance(text, str) or not text.strip():
        raise UserError(
            f"noise setting {text!r}: expected 'type:rate', e.g. 'symmetric:0.4' or 'clean'"
        )
    kind, sep, rate = (part.strip() for part in text.strip().partition(":"))
    kind = kind.lower()
    _check_type(kind)
    if kind == "clean":
        return NoiseSetting("clean", rate if sep else 0.0)
    if not rate:
        raise UserError(
            f"noise setting {text!r}: {kind} noise needs a value, e.g. '{_EXAMPLES[kind]}'"
        )
    return NoiseSetting(kind, rate.lower() if kind == "human" else rate)


def transition_matrix(
    noise_type: str, rate: float, num_classes: int, dataset: str | None = None
) -> np.ndarray:
    """The K×K row-stochastic matrix ``T[true, noisy]`` of clean, symmetric or asymmetric noise.

    Asymmetric maps by ``dataset`` (SPEC §4.1; names are case-insensitive, ``-`` equals ``_``):

    - ``cifar10``: 9→1, 2→0, 3→5, 5→3, 4→7; the other classes never flip.
    - ``cifar100``: 20 consecutive blocks of 5 classes; inside a block j→j+1, the last wraps to
      the first. These blocks are NOT the semantic super-classes (fine labels are alphabetical);
      the construction is kept because the published numbers (JAL, APL, ANL) were made with it.
    - ``mnist``, ``fashion_mnist``, ``kmnist``, ``digits``: 7→1, 2→7, 5↔6, 3→8.
    - anything else (or None): pair flip i → (i+1) mod K for every class.

    A flipping source class keeps 1−η and sends η to its target.
    """
    _check_type(noise_type)
    k = _check_num_classes(num_classes)
    if noise_type not in ("clean", "symmetric", "asymmetric"):
        raise UserError(
            f"noise_type: {noise_type} noise has no built-in transition matrix; "
            "use clean, symmetric or asymmetric (custom noise passes its own matrix)"
        )
    eta = _check_rate(noise_type, rate)
    if noise_type == "clean":
        return np.eye(k)
    if noise_type == "symmetric":
        return (1.0 - eta) * np.eye(k) + eta / (k - 1) * (np.ones((k, k)) - np.eye(k))
    return _asymmetric_matrix(eta, k, dataset)


def validation_transition(
    noise_type: str, rate: float | str, num_classes: int, dataset: str, val_labels: str
) -> np.ndarray | None:
    """The T of the validation labels, for `metrics.clean_accuracy`: the identity for clean ones,
    the setting's matrix for symmetric and asymmetric noise; None where T is unknown (dependent
    noise depends on the image, human noise has no model; custom matrices never reach a trial).
    """
    if val_labels == "clean" or noise_type == "clean":
        return np.eye(num_classes)
    if noise_type in ("symmetric", "asymmetric"):
        return transition_matrix(noise_type, float(rate), num_classes, dataset)
    return None


def _asymmetric_matrix(eta: float, k: int, dataset: str | None) -> np.ndarray:
    key = None if dataset is None else dataset.strip().lower().replace("-", "_")
    if key == "cifar100":
        if k != 100:
            raise UserError(f"num_classes: the cifar100 asymmetric map needs 100 classes, got {k}")
        targets = [
            (j // _CIFAR100_BLOCK) * _CIFAR100_BLOCK + (j + 1) % _CIFAR100_BLOCK for j in range(k)
        ]
        pairs = tuple(zip(range(k), targets, strict=True))
    elif key in _PAIR_MAPS:
        if k != 10:
            raise UserError(f"num_classes: the {key} asymmetric map needs 10 classes, got {k}")
        pairs = _PAIR_MAPS[key]
    else:
        pairs = tuple((i, (i + 1) % k) for i in range(k))
    matrix = np.eye(k)
    for source, target in pairs:
        matrix[source, source] = 1.0 - eta
        matrix[source, target] = eta
    return matrix


def corrupt_labels(
    labels: Any,
    noise_type: str,
    rate: float | str,
    num_classes: int,
    seed: int,
    dataset: str | None = None,
    *,
    features: np.ndarray | None = None,
    label_file: str | Path | None = None,
    matrix: np.ndarray | None = None,
) -> np.ndarray:
    """The noisy version of ``labels`` (a new int64 array of the same length).

    - clean: a copy.
    - symmetric / asymmetric: method-2 exact counts (module docstring) on ``transition_matrix``.
    - custom: the same on ``matrix`` (K×K, non-negative, rows summing to 1 within 1e-6; rows are
      renormalised to sum exactly 1).
    - dependent: the full noisy vector from ``label_file`` (JSON list or .npy, e.g. upstream's
      ``cifar10_dependent_0.4.json``) if given, used as is; otherwise generated from ``features``
      ((N, D) floats, normalised flattened images) as in SPEC §4.3: W ~ N(0, 1) of shape (K, D, K)
      (drawn class by class in float32), the first floor(η·N) indices of a permutation flip, each
      to a class drawn from softmax(x @ W[y]) with the true class masked out.
    - human: the label set ``rate`` (a CLI name from ``HUMAN_LABEL_KEYS`` or a raw key) of the
      CIFAR-N ``label_file`` (.pt, .npz, structured .npy or JSON object); if the file has
      ``clean_label`` it must equal ``labels``.

    Label files must hold one label in [0, K) per training sample, in train order.
    """
    _check_type(noise_type)
    k = _check_num_classes(num_classes)
    clean = _check_labels(labels, "labels", k)
    eta = _check_rate(noise_type, rate)
    rng = _make_rng(seed)
    if matrix is not None and noise_type != "custom":
        raise UserError(f"matrix: only custom noise uses a matrix, not {noise_type}; drop it")
    if label_file is not None and noise_type not in ("dependent", "human"):
        raise UserError(
            f"label_file: only dependent and human noise read a label file, not {noise_type}"
        )

    if noise_type == "clean":
        return clean.copy()
    if noise_type in ("symmetric", "asymmetric"):
        return _flip_exact_counts(clean, transition_matrix(noise_type, eta, k, dataset), rng)
    if noise_type == "custom":
        return _flip_exact_counts(clean, _check_matrix(matrix, k), rng)
    if noise_type == "human":
        if label_file is None:
            raise UserError(
                "label_file: human noise needs the CIFAR-N label file (e.g. CIFAR-10_human.pt)"
            )
        return _human_labels(clean, k, str(eta), Path(label_file))
    if label_file is not None:
        vector = _read_label_file(Path(label_file))
        if isinstance(vector, dict):
            raise UserError(
                f"label_file {label_file}: holds named label sets {sorted(vector)}; dependent "
                "noise needs one noisy label vector (a JSON list or a plain .npy array)"
            )
        return _check_file_labels(vector, clean, k, Path(label_file))
    if features is None:
        raise UserError(
            "features: generated dependent noise needs the (N, D) image features; "
            "pass features or a precomputed label_file"
        )
    return _dependent_labels(clean, k, float(eta), features, rng)


def realised_rate(clean: Any, noisy: Any) -> float:
    """The fraction of positions where ``noisy`` differs from ``clean``."""
    a, b = _pair(clean, noisy)
    if a.size == 0:
        raise UserError("labels: cannot compute a noise rate of an empty label vector")
    return float(np.mean(a != b))


def realised_matrix(clean: Any, noisy: Any, num_classes: int) -> np.ndarray:
    """Row-normalised confusion ``T[true, noisy]``; a class with no samples gets an identity row."""
    k = _check_num_classes(num_classes)
    a, b = _pair(clean, noisy, k)
    counts = np.bincount(a * k + b, minlength=k * k).reshape(k, k).astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.where(totals > 0, counts / np.maximum(totals, 1.0), np.eye(k))


def label_hash(noisy: Any) -> str:
    """First 16 hex digits of sha256 over the labels as little-endian int64 bytes.

    Depends only on the label values, not on the input's dtype or container.
    """
    values = _check_labels(noisy, "labels")
    return hashlib.sha256(values.astype("<i8").tobytes()).hexdigest()[:16]


# --- method 2 and the dependent generator -------------------------------------------------------


def _flip_exact_counts(
    clean: np.ndarray, matrix: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Relabel exactly floor(T[r, t]·n_r) samples of class r to t, for every r and t ≠ r.

    Drawing successive slices of one permutation of class r is drawing without replacement from
    its not-yet-flipped pool; classes and targets go in index order so the result is a function of
    the seed.
    """
    noisy = clean.copy()
    for r in range(matrix.shape[0]):
        pool = rng.permutation(np.flatnonzero(clean == r))
        start = 0
        for t in range(matrix.shape[0]):
            if t == r:
                continue
            count = math.floor(matrix[r, t] * pool.size + _COUNT_SLACK)
            noisy[pool[start : start + count]] = t
            start += count
    return noisy


def _dependent_labels(
    clean: np.ndarray, k: int, eta: float, features: Any, rng: np.random.Generator
) -> np.ndarray:
    x = _asarray(features, "features")
    if x.ndim != 2 or x.shape[0] != clean.size or not np.issubdtype(x.dtype, np.number):
        raise UserError(
            f"features: expected a numeric ({clean.size}, D) array of flattened images, "
            f"got shape {x.shape}"
        )
    flips = rng.permutation(clean.size)[: math.floor(eta * clean.size + _COUNT_SLACK)]
    noisy = clean.copy()
    for c in range(k):
        # W[c] is drawn for every class, sampled or not, so the stream does not depend on labels.
        weights = rng.standard_normal((x.shape[1], k), dtype=np.float32)
        picked = flips[clean[flips] == c]
        if picked.size == 0:
            continue
        scores = (x[picked].astype(np.float32) @ weights).astype(np.float64)
        scores[:, c] = -np.inf
        if not np.isfinite(scores[:, np.arange(k) != c]).all():
            raise UserError("features: must be finite (no NaN/inf); normalise the images first")
        # Inverse-CDF sampling on unnormalised softmax weights; the masked class has weight 0
        # and can never be drawn.
        cdf = np.cumsum(np.exp(scores - scores.max(axis=1, keepdims=True)), axis=1)
        u = rng.random(picked.size) * cdf[:, -1]
        noisy[picked] = np.argmax(cdf > u[:, None], axis=1)
    return noisy


# --- label files ---------------------------------------------------------------------------------


def _human_labels(clean: np.ndarray, k: int, key: str, path: Path) -> np.ndarray:
    table = _read_label_file(path)
    if not isinstance(table, dict):
        raise UserError(
            f"label_file {path}: holds a single label vector; human noise needs named label sets "
            "(a torch.save'd dict like CIFAR-10_human.pt, or an .npz with keys such as worse_label)"
        )
    wanted = HUMAN_LABEL_KEYS.get(key, key)
    if wanted not in table:
        raise UserError(
            f"rate: label set {key!r} ({wanted}) is not in {path}; it has {sorted(table)}; "
            f"CLI names: {sorted(HUMAN_LABEL_KEYS)}"
        )
    if "clean_label" in table:
        file_clean = _check_file_labels(table["clean_label"], clean, k, path, "clean_label")
        mismatches = int(np.count_nonzero(file_clean != clean))
        if mismatches:
            raise UserError(
                f"label_file {path}: its clean_label differs from the dataset's labels at "
                f"{mismatches} of {clean.size} positions; the file is not aligned with the "
                "dataset's train order (use the file made for this dataset's full training set)"
            )
    return _check_file_labels(table[wanted], clean, k, path, wanted)


def _read_label_file(path: Path) -> np.ndarray | dict[str, np.ndarray]:
    """A label vector, or a dict of named label vectors, from .json/.npy/.npz/.pt."""
    try:
        info = path.stat()
    except (OSError, ValueError):
        info = None
    if info is None or not stat.S_ISREG(info.st_mode):
        raise UserError(f"label_file {path}: no such file; check the path")
    suffix = path.suffix.lower()
    limit = MAX_JSON_LABEL_BYTES if suffix == ".json" else MAX_LABEL_FILE_BYTES
    if info.st_size > limit:
        raise UserError(
            f"label_file {path}: {info.st_size:,} bytes, more than {limit:,}; is it a label file?"
        )
    try:
        if suffix == ".json":
            data = parse_json(path.read_text())
            if isinstance(data, dict):
                return {str(key): np.asarray(value) for key, value in data.items()}
            return np.asarray(data)
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            if array.dtype.names:  # a structured array is a table without pickle
                return {name: array[name] for name in array.dtype.names}
            return array
        if suffix == ".npz":
            with zipfile.ZipFile(path) as archive:  # a zip bomb stops here
                if sum(member.file_size for member in archive.infolist()) > limit:
                    raise UserError(f"label_file {path}: unpacks to more than {limit:,} bytes")
            with np.load(path, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        if suffix == ".pt":
            return _torch_load_labels(path)
    except UserError:
        raise
    except RecursionError:
        raise UserError(f"label_file {path}: JSON nested too deep; expected a list") from None
    except Exception as err:
        # numpy, zipfile and torch raise a dozen types on a corrupt file (BadZipFile, EOFError,
        # MemoryError for a header declaring terabytes…): each means the file cannot be read.
        hint = ""
        if "allow_pickle" in str(err):
            hint = "; it holds pickled objects, re-save it with np.savez(path, **label_sets)"
        problem = _one_line(err) or type(err).__name__
        raise UserError(f"label_file {path}: cannot read it ({problem}){hint}") from None
    raise UserError(
        f"label_file {path}: unsupported extension {suffix!r}; use .json, .npy, .npz or .pt"
    )


def _torch_load_labels(path: Path) -> np.ndarray | dict[str, np.ndarray]:
    """Load a torch.save'd dict of numpy integer arrays (CIFAR-N) without arbitrary unpickling."""
    import pickle

    # torch is imported here only: it costs seconds and only .pt files need it.
    import torch

    reconstruct = np.empty(0).__reduce__()[0]  # numpy._core.multiarray._reconstruct on numpy 2
    allowed = [
        np.ndarray,
        np.dtype,
        reconstruct,
        # The CIFAR-N files were written under numpy 1.x, which named it numpy.core.
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        # Unpickling a dtype builds an instance of its class, e.g. numpy.dtypes.Int64DType.
        *(type(np.dtype(t)) for t in (np.int8, np.int16, np.int32, np.int64)),
        *(type(np.dtype(t)) for t in (np.uint8, np.uint16, np.uint32, np.uint64)),
    ]
    try:
        with torch.serialization.safe_globals(allowed):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        detail = f" (it needs {found.group(1)})" if found else ""
        raise UserError(
            f"label_file {path}: not loadable with torch.load(weights_only=True){detail}; it must "
            "be a torch.save'd dict of integer numpy arrays or tensors — or convert it to .npz"
        ) from None
    if isinstance(data, dict):
        return {str(key): _to_numpy(value) for key, value in data.items()}
    return _to_numpy(data)


def _to_numpy(value: Any) -> np.ndarray:
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def _check_file_labels(
    values: Any, clean: np.ndarray, k: int, path: Path, key: str | None = None
) -> np.ndarray:
    field = f"label_file {path}" + (f" [{key}]" if key else "")
    return _check_labels(values, field, k, size=clean.size)


# --- validation ----------------------------------------------------------------------------------


def _check_type(noise_type: Any) -> None:
    if noise_type not in NOISE_TYPES:
        raise UserError(f"noise_type: unknown {noise_type!r}; use one of {', '.join(NOISE_TYPES)}")


def _check_rate(noise_type: str, rate: Any) -> float | str:
    """The validated rate: a float for the numeric types, a safe name for human/custom."""
    if noise_type in ("human", "custom"):
        if not isinstance(rate, str) or not _NAME_RE.match(rate):
            what = "label-set key such as 'worst'" if noise_type == "human" else "matrix name"
            raise UserError(
                f"rate: {noise_type} noise takes a {what} "
                f"(letters, digits, '_', '.', '-'), got {rate!r}"
            )
        return rate
    value = _to_float(rate)
    if noise_type == "clean":
        ok, allowed = value == 0.0, "0"
    elif noise_type == "symmetric":
        ok, allowed = 0.0 <= value < 1.0, "[0, 1)"
    elif noise_type == "asymmetric":
        ok, allowed = 0.0 <= value <= 1.0, "[0, 1]"
    else:
        ok, allowed = 0.0 < value < 1.0, "(0, 1)"
    if not ok:
        raise UserError(f"rate: {noise_type} noise needs a rate in {allowed}, got {rate!r}")
    return value


def _to_float(rate: Any) -> float:
    if isinstance(rate, bool) or not isinstance(rate, int | float | str | np.number):
        raise UserError(f"rate: expected a number, got {type(rate).__name__} {rate!r}")
    try:
        value = float(rate)
    except ValueError:
        raise UserError(f"rate: expected a number such as 0.4, got {rate!r}") from None
    if not math.isfinite(value):
        raise UserError(f"rate: expected a finite number, got {rate!r}")
    return value


def _check_num_classes(num_classes: Any) -> int:
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, int | np.integer)
        or num_classes < 2
    ):
        raise UserError(f"num_classes: expected an integer >= 2, got {num_classes!r}")
    return int(num_classes)


def _make_rng(seed: Any) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise UserError(f"seed: expected a non-negative integer, got {seed!r}")
    return np.random.default_rng(int(seed))


def _check_labels(
    values: Any, field: str, k: int | None = None, size: int | None = None
) -> np.ndarray:
    """``values`` as int64 after checking: 1-D, integer, in [0, k) and of length ``size``."""
    array = _asarray(values, field)
    if size is not None:
        expected = f"expected a 1-D vector of {size} integer labels, one per training sample"
    else:
        expected = "expected a 1-D vector of integer class indices"
    if k is not None:
        expected += f", in [0, {k})"
    if array.ndim != 1 or (size is not None and array.size != size):
        raise UserError(f"{field}: has shape {array.shape}; {expected}")
    if array.size and array.dtype.kind not in "iu":
        raise UserError(f"{field}: has {array.dtype} values; {expected}")
    if array.size and k is not None and (array.min() < 0 or array.max() >= k):
        raise UserError(f"{field}: labels span [{array.min()}, {array.max()}]; {expected}")
    return array.astype(np.int64)


def _check_matrix(matrix: Any, k: int) -> np.ndarray:
    if matrix is None:
        raise UserError("matrix: custom noise needs a K×K row-stochastic matrix T[true, noisy]")
    m = _asarray(matrix, "matrix", np.float64)
    if m.shape != (k, k):
        raise UserError(f"matrix: expected shape ({k}, {k}) for {k} classes, got {m.shape}")
    if not np.isfinite(m).all() or (m < 0).any():
        raise UserError("matrix: entries must be finite and non-negative")
    sums = m.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > 1e-6)
    if bad.size:
        raise UserError(
            f"matrix: row {bad[0]} sums to {sums[bad[0]]:.6g}; each row T[true, :] must sum to 1"
        )
    return m / sums[:, None]


def _pair(clean: Any, noisy: Any, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    a, b = _check_labels(clean, "clean", k), _check_labels(noisy, "noisy", k)
    if a.size != b.size:
        raise UserError(f"noisy: has {b.size} labels but clean has {a.size}; they must align")
    return a, b


def _asarray(values: Any, field: str, dtype: Any = None) -> np.ndarray:
    try:
        return np.asarray(values, dtype=dtype)
    except (TypeError, ValueError):
        raise UserError(f"{field}: expected a numeric array, got {type(values).__name__}") from None


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:200]
