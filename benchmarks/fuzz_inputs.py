"""Fuzz every user input: spec files, exported configs, label files and CLI argument vectors.

Hypothesis generates the inputs (seeded): random YAML trees, mutated shipped specs (as data and
as bytes), plausible specs, random bytes, deep nesting, alias bombs and recursive aliases,
duplicate keys, odd YAML tags; mutated exports as YAML and JSON; label files (.json, .npy, .npz,
.pt) made by numpy and torch, then cut or corrupted; argument vectors drawn from the real parser's
verbs, flags and choices. Each input runs in a forked worker that imported everything once:

- `cli.main(argv)` in an empty temporary working directory (label files: `noise.corrupt_labels`),
  with everything that would start Ray, train or download replaced by a stop: an input that gets
  that far has passed every check and counts as accepted (exit 0);
- under an address-space limit of the worker's size at start + 1 GiB, and a 5 s deadline.

Outcomes: `exit 0`; `exit 2` (exactly one `jal-search: error:` line on stderr); `traceback` (an
exception escaped); `bad exit` (another exit code, or exit 2 without exactly that one line);
`wrote` (files left in the working directory); `crash` (the worker died); `timeout`; `memory`.
Target: none but exit 0 and exit 2.

    .venv/bin/python benchmarks/fuzz_inputs.py --short     # 300 inputs, ~15 s
    .venv/bin/python benchmarks/fuzz_inputs.py             # 10,000 inputs, a few minutes
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

MEMORY_LIMIT = 1 << 30  # bytes of address space above the worker's size at start
TIME_LIMIT = 5.0  # seconds per input
ACCEPTED = ("exit 0", "exit 2")
OUTCOMES = (*ACCEPTED, "traceback", "bad exit", "wrote", "crash", "timeout", "memory")
PREFIX = "jal-search: error: "
SPACES = Path(__file__).resolve().parent.parent / "jal_search" / "search_spaces"
SHIPPED = {p.stem: p.read_bytes() for p in sorted(SPACES.glob("*.yaml"))}


@dataclass
class Case:
    """One input: files to create in the working directory, then `argv` for `cli.main`, or a
    label file for `noise.corrupt_labels` (`labels`: noise type and rate)."""

    family: str
    files: dict[str, bytes | tuple[bytes, int]] = field(default_factory=dict)  # (chunk, repeats)
    argv: list[str] = field(default_factory=list)
    labels: tuple[str, Any] | None = None


@dataclass
class Result:
    outcome: str
    seconds: float = 0.0
    peak_mib: float = 0.0  # peak resident memory during the input, above the worker's at start
    detail: str = ""


# ---------------------------------------------------------------------------------- strategies
ODD_TEXT = (
    "", " ", "quick", "smoke", "digits", "mnist", "cifar10", "jal_ce", "ce", "gce", "nceandamse",
    "symmetric", "asymmetric", "dependent", "human", "clean", "custom", "worst", "symmetric:0.4",
    "human:worst", "dependent:1.5", "clean:0.1", ".inf", "-.inf", ".nan", "nan", "inf", "1e-3",
    "1e999", "yes", "off", "~", "null", "2001-02-30", "~nosuchuser/x", "../x", "/dev/zero",
    "/dev/null", "/", "a" * 300, "x/" * 2100, "é", "\u2028", "\ud800", "\x00", "a\nb", "\x1b[31m",
    "sqlite:///x.db", "http://user:pw@host", "file://x", "grid", "random", "optuna", "asha",
    "none", "exclude", "flag", "noisy", "auto", "bf16", "cuda:0", "cnn_small", "a=1",
)  # fmt: skip
KEYS = (
    "name", "description", "dataset", "data_root", "train_subset", "loss", "noise", "noise_files",
    "space", "training", "val_fraction", "val_labels", "budget", "scheduler", "searcher",
    "amse_bound", "paper_configs_first", "seed", "resources", "max_concurrent_trials",
    "max_failures", "pack", "storage_path", "storage_shared", "tracking_uri", "extends", "trials",
    "epochs", "type", "grace_period", "reduction_factor", "cpus_per_trial", "gpus_per_trial",
    "loguniform", "uniform", "choice", "fixed", "alpha", "beta", "a", "q", "gamma", "lr", "l1",
    "l2", "batch_size", "model", "symmetric", "asymmetric", "dependent", "human", "clean",
    "settings", "config", "symmetric-0.4", "loss_params", "noise_type", "noise_rate", "<<",
)  # fmt: skip
SPECIAL_NUMBERS = (
    0, 1, -1, 2, 10**6, 2**32, 2**63, 10**100, 0.0, -0.0, 0.5, 1.5, 1e-320, 1e308, 1.7e308,
    float("inf"), float("-inf"), float("nan"), True, False,
)  # fmt: skip
TOKENS = (
    b":", b": ", b"-", b"- ", b"[", b"]", b"{", b"}", b",", b"&a ", b"*a", b"!!", b"!!binary ",
    b"!!timestamp ", b"!!python/object/apply:os.getcwd []", b"!!set ", b"\t", b"\n", b"  ",
    b"#", b"'", b'"', b"\xff", b"\x00", b"\xc3", b".inf", b".nan", b"true", b"~", b"<<: *a\n",
    b"%YAML 1.1\n", b"---\n", b"...\n", b"? ", b"|", b">", b"1" * 5000, b"\r\n", b"\xef\xbb\xbf",
)  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.integers(),
    st.floats(),
    st.sampled_from(SPECIAL_NUMBERS),
    st.text(max_size=12),
    st.sampled_from(ODD_TEXT),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=8), st.integers(-3, 3))
trees = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(keys, children, max_size=6),
    max_leaves=25,
)


@st.composite
def rendered(draw: st.DrawFn, doc: Any) -> tuple[bytes, str]:
    """`doc` as file bytes and a suffix: block or flow YAML, or JSON."""
    style = draw(st.sampled_from(("block", "flow", "json")))
    try:
        if style == "json":
            return json.dumps(doc).encode(), ".json"
        flow = style == "flow"
        text = yaml.safe_dump(doc, default_flow_style=flow, allow_unicode=True, sort_keys=False)
        return text.encode("utf-8", "surrogatepass"), ".yaml"
    except (TypeError, ValueError, yaml.YAMLError):  # keys JSON cannot write, say
        return repr(doc).encode("utf-8", "surrogatepass"), ".yaml"


def _places(doc: Any, at: tuple = ()) -> list[tuple]:
    """Every path to a value in `doc`, and to each mapping (for adding keys)."""
    out = [at]
    items = (
        doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    )
    for key, value in items:
        out += _places(value, (*at, key))
    return out


@st.composite
def mutated(draw: st.DrawFn, doc: Any) -> Any:
    """`doc` with 1–4 values replaced, deleted, added or wrapped."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(_places(doc)))
        if not path:
            if isinstance(doc, dict):
                doc[draw(keys)] = draw(trees)
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        last = path[-1]
        op = draw(st.sampled_from(("replace", "replace", "delete", "add", "wrap", "number")))
        if op == "replace":
            parent[last] = draw(trees)
        elif op == "number":
            parent[last] = draw(st.sampled_from(SPECIAL_NUMBERS))
        elif op == "delete":
            del parent[last]
        elif op == "wrap":
            parent[last] = draw(st.sampled_from(([parent[last]], {"fixed": parent[last]})))
        elif isinstance(parent[last], dict):
            parent[last][draw(keys)] = draw(trees)
    return doc


@st.composite
def bytes_mutated(draw: st.DrawFn, texts: list[bytes]) -> bytes:
    """A text with 1–5 byte-level edits: tokens inserted, bytes cut or replaced, lines doubled."""
    text = bytearray(draw(st.sampled_from(texts)))
    for _ in range(draw(st.integers(1, 5))):
        pos = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(("insert", "delete", "replace", "double")))
        if op == "insert":
            text[pos:pos] = draw(st.sampled_from(TOKENS) | st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del text[pos : pos + draw(st.integers(1, 20))]
        elif op == "replace" and pos < len(text):
            text[pos] = draw(st.integers(0, 255))
        else:  # a line twice: duplicate keys
            start = text.rfind(b"\n", 0, pos) + 1
            end = text.find(b"\n", pos)
            line = bytes(text[start : end + 1 if end >= 0 else len(text)])
            text[start:start] = line if line.endswith(b"\n") else line + b"\n"
    return bytes(text)


def alias_bomb(levels: int, width: int, merge: bool) -> bytes:
    """`levels` levels of `width` aliases each: width**levels values once expanded."""
    lines = ["a0: &a0 {x: 1}" if merge else "a0: &a0 [x]"]
    for i in range(1, levels + 1):
        refs = ", ".join([f"*a{i - 1}"] * width)
        lines.append(f"a{i}: &a{i} {{<<: [{refs}]}}" if merge else f"a{i}: &a{i} [{refs}]")
    return ("\n".join(lines) + "\nname: bomb\n").encode()


@st.composite
def structural(draw: st.DrawFn) -> tuple[bytes | tuple[bytes, int], str]:
    """Documents built to hurt a parser: bombs, self-reference, depth, size, tags, odd bytes."""
    kind = draw(
        st.sampled_from(
            ("bomb", "recursive", "deep", "deep_block", "big", "tags", "bytes", "bigint", "dup")
        )
    )
    suffix = draw(st.sampled_from((".yaml", ".yml", ".json")))
    if kind == "bomb":
        return alias_bomb(
            draw(st.integers(1, 10)), draw(st.integers(1, 10)), draw(st.booleans())
        ), suffix
    if kind == "recursive":
        return draw(
            st.sampled_from((b"a: &a [*a]\n", b"&a {b: *a}\n", b"n: &n {<<: *n}\n"))
        ), suffix
    if kind == "deep":
        opener, closer = draw(st.sampled_from(((b"[", b"]"), (b"{a: ", b"}"), (b'{"a": ', b"}"))))
        depth = draw(st.sampled_from((5, 19, 20, 21, 100, 1000, 10**5)))
        return opener * depth + b"1" + closer * draw(st.sampled_from((0, depth))), suffix
    if kind == "deep_block":
        depth = draw(st.integers(1, 300))
        return b"".join(b"  " * i + b"k:\n" for i in range(depth)) + b"  " * depth + b"v\n", suffix
    if kind == "big":  # around the 1 MiB bound, materialised by the worker
        chunk = draw(st.sampled_from((b"# comment\n", b"a: 1\n", b"- 1\n", b"x" * 1024)))
        size = draw(st.sampled_from(((1 << 20) - 512, (1 << 20) + 1, 8 << 20)))
        return (chunk, size // len(chunk)), suffix
    if kind == "tags":
        tag = draw(
            st.sampled_from(
                (
                    "!!timestamp 2001-02-30",
                    "!!binary '!!'",
                    "!!set {a, b}",
                    "!!omap [{a: 1}]",
                    "!!int 0x",
                    "!!float nope",
                    "!foo bar",
                    "!!python/name:os.system",
                    "!!str",
                    "!!bool maybe",
                )
            )
        )
        return f"name: {tag}\ndataset: digits\n".encode(), suffix
    if kind == "bigint":
        return b"name: x\nbudget: {trials: " + b"9" * draw(
            st.sampled_from((19, 4300, 5000))
        ) + b"}\n", suffix
    if kind == "dup":
        key = draw(st.sampled_from(("loss", "name", "budget", "a")))
        return f"{key}: 1\nname: x\n{key}: 2\n".encode(), suffix
    return draw(st.binary(max_size=2000)), suffix


NOISE_TYPES = ("clean", "symmetric", "asymmetric", "dependent", "human", "custom", "bogus")
PARAM = st.one_of(
    st.builds(lambda lo, hi: {"loguniform": [lo, hi]}, scalars, scalars),
    st.builds(lambda lo, hi: {"uniform": [lo, hi]}, scalars, scalars),
    st.builds(lambda c: {"choice": c}, st.lists(scalars, max_size=4)),
    scalars,
)


@st.composite
def plausible_spec(draw: st.DrawFn) -> dict[str, Any]:
    """A spec with the right shape and values near the edges: many pass, and reach plan()."""
    # Mostly valid values, so that most specs get as far as plan(); then the edges.
    small = st.sampled_from((1, 2, 3, 5, 1, 2, 3, 0, 100, -1, 2.0, True, "2", 100_001))
    rates = st.sampled_from((0.0, 0.2, 0.4, 0.6, 0.8, 1.0, "worst", "aggre"))
    spec: dict[str, Any] = {
        "name": draw(st.sampled_from(("fz", "fz", "fz", "a.b-c_1", "-x", "a" * 101, "x/y", ""))),
        "dataset": draw(
            st.sampled_from(("digits", "digits", "mnist", "cifar10", "cifar100", "webvision", "x"))
        ),
        "loss": draw(
            st.sampled_from(("jal_ce", "jal_fl", "ce", "gce", "nce_rce", "anl_ce", "nope"))
        ),
        "noise": draw(
            st.dictionaries(
                st.sampled_from(NOISE_TYPES),
                st.lists(st.one_of(rates, rates, rates, scalars), min_size=1, max_size=3),
                min_size=1,
                max_size=3,
            )
        ),
        "budget": {"trials": draw(small), "epochs": draw(small)},
    }
    optional: dict[str, st.SearchStrategy] = {
        "space": st.dictionaries(
            st.sampled_from(("alpha", "beta", "a", "q", "gamma", "lr", "l1", "batch_size", "zz")),
            PARAM,
            max_size=4,
        ),
        "scheduler": st.fixed_dictionaries(
            {"type": st.sampled_from(("asha", "none", "x"))},
            optional={"grace_period": small, "reduction_factor": scalars},
        ),
        "searcher": st.fixed_dictionaries(
            {"type": st.sampled_from(("optuna", "random", "grid", "x"))}, optional={"seed": small}
        ),
        "resources": st.fixed_dictionaries(
            {}, optional={"cpus_per_trial": scalars, "gpus_per_trial": scalars}
        ),
        "pack": small,
        "amse_bound": st.sampled_from(("exclude", "flag", "x")),
        "val_fraction": scalars,
        "training": st.dictionaries(
            st.sampled_from(("lr", "batch_size", "model", "epochs", "precision", "x")),
            scalars,
            max_size=3,
        ),
        "storage_path": st.sampled_from(ODD_TEXT),
        "data_root": st.sampled_from(ODD_TEXT),
        "noise_files": st.dictionaries(
            st.sampled_from(("dependent-0.4", "x")), st.sampled_from(ODD_TEXT), max_size=2
        ),
        "tracking_uri": st.sampled_from(ODD_TEXT),
        "extends": st.one_of(st.sampled_from(tuple(SHIPPED)), scalars, trees),
        "max_concurrent_trials": small,
        "seed": st.one_of(small, st.sampled_from(SPECIAL_NUMBERS)),
    }
    for key in draw(st.lists(st.sampled_from(sorted(optional)), max_size=5, unique=True)):
        spec[key] = draw(optional[key])
    return spec


def _raw(name: str) -> Any:
    return yaml.safe_load(SHIPPED[name])


@st.composite
def spec_case(draw: st.DrawFn) -> Case:
    how = draw(st.sampled_from(("tree", "mutated", "plausible", "bytes", "structural", "shipped")))
    if how == "structural":
        content, suffix = draw(structural())
    elif how == "bytes":
        content, suffix = draw(bytes_mutated(list(SHIPPED.values()))), ".yaml"
    elif how == "shipped":
        content, suffix = SHIPPED[draw(st.sampled_from(sorted(SHIPPED)))], ".yaml"
    else:
        doc = {
            "tree": trees,
            "mutated": st.sampled_from(sorted(SHIPPED)).flatmap(lambda n: mutated(_raw(n))),
            "plausible": plausible_spec(),
        }[how]
        content, suffix = draw(rendered(draw(doc)))
    name = f"spec{suffix}"
    argv = draw(
        st.sampled_from(
            (
                ["validate", name],
                ["run", name],
                ["run", name, "--name", "n2", "--storage-path", "st"],
                ["run", name, "--data-root", "data", "--tracking-uri", "sqlite:///m.db"],
            )
        )
    )
    return Case(f"spec:{how}", {name: content}, argv)


def export_doc() -> dict[str, Any]:
    """An export as `jal-search export` writes it, for a digits config."""
    from jal_search.config import trial_config

    config = trial_config(
        {"dataset": "digits", "loss": "jal_ce", "noise_type": "symmetric", "noise_rate": 0.4}
    ).resolve()
    entry = {"trial_id": "abc", "val_acc": 0.5, "test_acc": 0.9, "epochs_reached": 3}
    return {
        "source": {"experiment": "fz", "path": "/x", "git_sha": None, "created": "2026"},
        "selection": {"metric": "val_acc", "scope": "last", "val_labels": "noisy"},
        "settings": {
            "symmetric-0.4": {**entry, "config": config.model_dump(mode="json")},
            "clean": {**entry, "config": config.model_dump(mode="json") | {"noise_rate": 0.0}},
        },
    }


@st.composite
def export_case(draw: st.DrawFn, template: dict[str, Any]) -> Case:
    how = draw(st.sampled_from(("mutated", "mutated", "bytes", "structural", "tree")))
    if how == "structural":
        content, suffix = draw(structural())
    elif how == "bytes":
        content, suffix = draw(bytes_mutated([yaml.safe_dump(template).encode()])), ".yaml"
    else:
        doc = draw(mutated(template)) if how == "mutated" else draw(trees)
        content, suffix = draw(rendered(doc))
    name = f"best{suffix}"
    setting = draw(st.sampled_from((None, "symmetric-0.4", "clean", "nope", "")))
    argv = ["train", "--config", name] + ([] if setting is None else ["--setting", setting])
    return Case(f"export:{how}", {name: content}, argv)


def _cli_verbs() -> dict[str, list[Any]]:
    """Each verb's argparse actions, read from the real parser."""
    from jal_search.cli import build_parser

    parser = build_parser()
    (verbs,) = [a for a in parser._actions if a.choices and isinstance(a.choices, dict)]
    return {v: [a for a in p._actions if a.dest != "help"] for v, p in verbs.choices.items()}


NUMBERS_TEXT = (
    "0",
    "1",
    "2",
    "-1",
    "3",
    "1.5",
    "1e999",
    "nan",
    "inf",
    "-inf",
    "abc",
    "",
    "9" * 5000,
    "0x10",
    "1_000",
)
PATHS = (
    "spec.yaml",
    "nowhere",
    ".",
    "",
    "/",
    "/dev/zero",
    "/dev/null",
    "~nosuchuser/x",
    "a" * 300,
    "x/" * 2100,
    "quick",
    "smoke",
    "jal_results/quick",
    "a\x00b",
    "\ud800",
)


@st.composite
def argv_case(draw: st.DrawFn, verbs: dict[str, list[Any]]) -> Case:
    verb = draw(st.sampled_from((*sorted(verbs), "launch", "", "-h", "--help", "--version")))
    argv = [verb] if verb else []
    actions = verbs.get(verb, [])
    chosen = draw(st.lists(st.sampled_from(actions), max_size=6, unique_by=id)) if actions else []
    for action in chosen:
        if action.option_strings:
            argv.append(draw(st.sampled_from(action.option_strings)))
            if action.nargs == 0:
                continue
        if action.choices:
            values = st.sampled_from(tuple(action.choices)) | st.sampled_from(ODD_TEXT)
        elif getattr(action.type, "__name__", "") in ("int", "float"):
            values = st.sampled_from(("1", "2", "3")) | st.sampled_from(NUMBERS_TEXT)
        elif getattr(action.type, "__name__", "") == "_path":
            values = st.sampled_from(PATHS)
        else:
            values = st.sampled_from(ODD_TEXT) | st.text(max_size=10)
        argv.append(draw(values))
    if draw(st.booleans()):  # a stray token somewhere
        argv.insert(
            draw(st.integers(0, len(argv))), draw(st.sampled_from((*ODD_TEXT, "--", "-x", "-h")))
        )
    files = {"spec.yaml": SHIPPED["smoke"]} if "spec.yaml" in argv else {}
    return Case("argv", files, argv)


@st.composite
def label_case(draw: st.DrawFn) -> Case:
    """A label file for 20 samples of 10 classes, mostly of the layout its noise type reads (one
    vector for dependent noise, named sets for human noise), then maybe cut or corrupted."""
    import numpy as np
    import torch

    kind = draw(st.sampled_from(("dependent", "human")))
    rate = 0.4 if kind == "dependent" else draw(st.sampled_from(("worst", "aggre", "clean", "zz")))
    suffix = draw(st.sampled_from((".json", ".npy", ".npz", ".pt") * 3 + (".csv", "")))
    length = draw(st.sampled_from((20, 20, 20, 0, 3, 19, 21)))
    values = draw(
        st.just([i % 10 for i in range(length)])  # the clean labels: a human set may match them
        | st.lists(st.integers(0, 9), min_size=length, max_size=length)
        | st.lists(st.integers(-2, 12), min_size=length, max_size=length)
    )
    dtype = draw(st.sampled_from(("int64", "int64", "int8", "uint8", "float64", "bool", "U2")))
    array = np.array(values).astype(dtype)
    if draw(st.integers(0, 3)) == 0:
        array = array.reshape(1, -1) if draw(st.booleans()) else np.stack([array, array])
    names = ("worse_label", "clean_label", "aggre_label", "x")
    table = {k: array for k in draw(st.lists(st.sampled_from(names), min_size=1, unique=True))}
    vector = (kind == "dependent") == (draw(st.integers(0, 3)) > 0)  # mostly the right layout
    buffer = io.BytesIO()
    if suffix == ".json":
        doc = values if vector else {k: values for k in table}
        buffer.write(json.dumps(draw(st.just(doc) | st.just(doc) | trees)).encode())
    elif suffix == ".npy":
        odd = (np.array([object()]), np.zeros(2, dtype=[("worse_label", "i8")]))
        np.save(buffer, array if vector else draw(st.sampled_from(odd)))
    elif suffix == ".npz":
        np.savez(buffer, **table)
    elif suffix == ".pt":
        tensor = torch.as_tensor(np.asarray(values, dtype="int64"))
        torch.save(
            tensor if vector else {k: draw(st.sampled_from((v, tensor))) for k, v in table.items()},
            buffer,
        )
    content = buffer.getvalue()
    damage = draw(st.sampled_from(("none",) * 4 + ("cut", "flip", "random", "header")))
    if damage == "cut":
        content = content[: draw(st.integers(0, len(content)))]
    elif damage == "flip" and content:
        at = draw(st.integers(0, len(content) - 1))
        content = content[:at] + bytes([draw(st.integers(0, 255))]) + content[at + 1 :]
    elif damage == "random":
        content = draw(st.binary(max_size=600))
    elif damage == "header":  # an .npy header that declares far more data than follows
        shape = draw(
            st.sampled_from(("(10000000000000,)", "(100000000,)", "(-1,)", "(20, 0)", "()"))
        )
        header = f"{{'descr': '<i8', 'fortran_order': False, 'shape': {shape}, }}".ljust(117) + "\n"
        content = (
            b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(16)
        )
    return Case(f"labels{suffix or ':none'}", {f"labels{suffix}": content}, labels=(kind, rate))


def any_case() -> st.SearchStrategy[Case]:
    """Every family, in equal shares."""
    return st.one_of(spec_case(), export_case(export_doc()), argv_case(_cli_verbs()), label_case())


def generate(count: int, seed: int) -> list[Case]:
    """`count` cases from Hypothesis, seeded (generation only: no shrinking, no database)."""
    cases: list[Case] = []
    strategy = any_case()
    while len(cases) < count:

        @hypothesis_seed(seed + len(cases))
        @settings(
            max_examples=count - len(cases),
            database=None,
            phases=[Phase.generate],
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(strategy)
        def collect(case: Case) -> None:
            cases.append(case)

        collect()
    return cases[:count]


# ------------------------------------------------------------------------------------- workers
class _Started(Exception):
    """Raised where an input would start Ray, train or download: it passed every check."""


def _stop(*args: Any, **kwargs: Any) -> Any:
    raise _Started


def _install_stops() -> None:
    from jal_search import data, search, train

    search._session = _stop  # Ray
    search._check_data = _stop  # datasets and models, before Ray
    data.load_dataset = _stop  # --download
    train.run_trial = _stop


def _status(key: str) -> int:
    """A /proc/self/status figure in bytes (VmSize, VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def execute(case: Case, base: Path) -> Result:
    """Run one case in this process (a worker): a fresh working directory, output captured."""
    from jal_search.cli import main
    from jal_search.errors import UserError

    cwd = Path(tempfile.mkdtemp(dir=base))
    os.chdir(cwd)
    for name, content in case.files.items():
        data = content[0] * content[1] if isinstance(content, tuple) else content
        (cwd / name).write_bytes(data)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the peak of this input alone
    rss = _status("VmRSS")
    out, err = io.StringIO(), io.StringIO()
    began = time.perf_counter()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            if case.labels is None:
                code = main(case.argv)
            else:
                code = _labels(case, cwd, UserError)
        outcome, detail = _exit(code, err.getvalue())
    except _Started:
        outcome, detail = "exit 0", ""
    except SystemExit as stop:  # argparse's --help
        outcome, detail = _exit(stop.code if isinstance(stop.code, int) else 1, err.getvalue())
    except MemoryError:
        outcome, detail = "memory", "MemoryError"
    except BaseException:  # noqa: BLE001 - what the fuzzer is looking for
        outcome, detail = "traceback", traceback.format_exc()[-3000:]
    seconds = time.perf_counter() - began
    left = sorted(set(os.listdir(cwd)) - set(case.files))
    if left and outcome in ACCEPTED:
        outcome, detail = "wrote", f"left {left}"
    os.chdir(base)
    shutil.rmtree(cwd, ignore_errors=True)
    peak = max(0, _status("VmHWM") - rss) / 2**20
    return Result(outcome, seconds, peak, detail)


def _labels(case: Case, cwd: Path, user_error: type[Exception]) -> int:
    import numpy as np

    from jal_search import noise

    kind, rate = case.labels  # type: ignore[misc]
    (name,) = case.files
    try:
        noise.corrupt_labels(np.arange(20) % 10, kind, rate, 10, seed=0, label_file=cwd / name)
    except user_error as error:
        print(f"{PREFIX}{error}", file=sys.stderr)
        return 2
    return 0


def _exit(code: int, stderr: str) -> tuple[str, str]:
    if code == 0:
        return "exit 0", ""
    lines = stderr.splitlines()
    if code == 2 and len(lines) == 1 and lines[0].startswith(PREFIX):
        return "exit 2", lines[0]
    return "bad exit", f"code {code}, stderr {stderr[-1000:]!r}"


class Worker:
    """A forked child that runs cases sent to it one at a time, under the limits."""

    def __init__(self, base: Path) -> None:
        self.base = base
        cases_r, self.cases_w = os.pipe()
        self.results_r, results_w = os.pipe()
        self.log = tempfile.NamedTemporaryFile(dir=base, prefix="stderr-", delete=False)
        self.pid = os.fork()
        if self.pid == 0:  # the worker
            os.close(self.cases_w)
            os.close(self.results_r)
            os.dup2(self.log.fileno(), 2)  # a Rust panic or a fatal error writes here
            size = _status("VmSize")
            resource.setrlimit(resource.RLIMIT_AS, (size + MEMORY_LIMIT, resource.RLIM_INFINITY))
            _install_stops()
            code = 0
            try:
                while (case := _receive(cases_r)) is not None:
                    _send(results_w, execute(case, base))
            except BaseException:  # noqa: BLE001 - the parent reports a crash, with this
                traceback.print_exc()
                code = 1
            os._exit(code)
        os.close(cases_r)
        os.close(results_w)

    def run(self, case: Case) -> Result:
        """The case's result; a dead or stuck worker is reported as crash, memory or timeout."""
        try:
            _send(self.cases_w, case)
        except BrokenPipeError:
            return self._died()
        ready, _, _ = select.select([self.results_r], [], [], TIME_LIMIT)
        if not ready:
            self.close()
            return Result("timeout", TIME_LIMIT, detail=f"over {TIME_LIMIT:g} s")
        result = _receive(self.results_r)
        return result if result is not None else self._died()

    def _died(self) -> Result:
        _, status = os.waitpid(self.pid, 0)
        self.pid = 0
        log = Path(self.log.name).read_text(errors="replace")[-2000:]
        memory = "memory allocation" in log or "MemoryError" in log
        how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else "exit"
        return Result("memory" if memory else "crash", detail=f"{how}: {log}")

    def close(self) -> None:
        """Kill the worker if alive and release its pipes and log; a second call does nothing."""
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = 0
        if not self.log.closed:
            for fd in (self.cases_w, self.results_r):
                os.close(fd)
            self.log.close()
            os.unlink(self.log.name)

    @property
    def alive(self) -> bool:
        return self.pid != 0


def _send(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj)
    view = memoryview(struct.pack("<Q", len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def _receive(fd: int) -> Any:
    head = _read(fd, 8)
    return None if head is None else pickle.loads(_read(fd, struct.unpack("<Q", head)[0]) or b"")


def _read(fd: int, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class Runner:
    """Runs cases in workers, starting a new one after a crash or timeout."""

    def __init__(self) -> None:
        _preload()
        self.base = Path(tempfile.mkdtemp(prefix="jal-fuzz-"))
        self.worker: Worker | None = None

    def run(self, case: Case) -> Result:
        if self.worker is None or not self.worker.alive:
            if self.worker is not None:
                self.worker.close()
            self.worker = Worker(self.base)
        return self.worker.run(case)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
        shutil.rmtree(self.base, ignore_errors=True)


def _preload() -> None:
    """Import once, before forking, everything a case may reach (torch included)."""
    import jal_search.cli  # noqa: F401
    import jal_search.report  # noqa: F401 - matplotlib
    import jal_search.search  # noqa: F401
    import jal_search.tracking  # noqa: F401 - MLflow (sync)
    import jal_search.train  # noqa: F401 - torch
    import jal_search.tune_adapter  # noqa: F401 - Ray (evaluate, resume)


# ---------------------------------------------------------------------------------------- main
def report(cases: list[Case], results: list[Result], seconds: float) -> bool:
    import _common  # the script's own folder; tests import this file without it on sys.path

    counts = Counter(r.outcome for r in results)
    print(f"inputs: {len(results)} in {seconds:.0f} s ({len(results) / seconds:.0f} per second)")
    for outcome in OUTCOMES:
        print(f"  {outcome:10} {counts[outcome]}")
    families = Counter(c.family for c in cases)
    print("by family (exit 0 / exit 2 / other):")
    for family in sorted(families):
        mine = [r.outcome for c, r in zip(cases, results, strict=True) if c.family == family]
        other = len(mine) - mine.count("exit 0") - mine.count("exit 2")
        print(f"  {family:18} {mine.count('exit 0'):6} {mine.count('exit 2'):6} {other:6}")
    slowest = max(results, key=lambda r: r.seconds)
    largest = max(results, key=lambda r: r.peak_mib)
    print(
        f"slowest input: {slowest.seconds:.2f} s; largest: {largest.peak_mib:.0f} MiB above start"
    )
    shown = Counter[str]()
    for case, result in zip(cases, results, strict=True):
        if result.outcome not in ACCEPTED and shown[result.outcome] < 3:
            shown[result.outcome] += 1
            print(f"--- {result.outcome} ({case.family}) argv={case.argv!r} labels={case.labels!r}")
            print(result.detail)
    bad = len(results) - counts["exit 0"] - counts["exit 2"]
    return _common.ratio("inputs not exiting 0 or 2 / inputs", bad / len(results), "<=", 0)


def main() -> int:
    import _common

    p = _common.parser(__doc__.splitlines()[0], timing=False)
    p.add_argument("--inputs", type=int, help="how many (default 10,000; --short: 300)")
    p.add_argument("--seed", type=int, default=0, help="Hypothesis seed (default 0)")
    args = p.parse_args()
    count = args.inputs or (300 if args.short else 10_000)
    _common.header(
        "fuzz_inputs",
        args,
        inputs=count,
        seed=args.seed,
        limits=f"{MEMORY_LIMIT >> 20} MiB above the worker's start, {TIME_LIMIT:g} s per input",
    )
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as home:  # Hypothesis's caches, not ./.hypothesis
        set_hypothesis_home_dir(home)
        cases = generate(count, args.seed)
    print(f"generated in {time.perf_counter() - began:.0f} s", flush=True)
    runner = Runner()
    began = time.perf_counter()
    try:
        results = [runner.run(case) for case in cases]
    finally:
        runner.close()
    return 0 if report(cases, results, time.perf_counter() - began) else 1


if __name__ == "__main__":
    sys.exit(main())
