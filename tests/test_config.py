"""Trial configs and profiles: defaults resolve to the paper's values; bad fields are named."""

import time

import pytest

from jal_search.config import TrialConfig, parse_document, trial_config
from jal_search.errors import UserError
from jal_search.losses import build_loss, loss_names
from jal_search.profiles import LOSS_TABLES, PROFILES, shipped_loss_params, weight_decay


def test_resolve_fills_the_paper_setup_for_cifar10_jal():
    cfg = TrialConfig(dataset="cifar10", loss="JAL_CE").resolve()
    assert (cfg.loss, cfg.model, cfg.epochs, cfg.lr, cfg.batch_size) == (
        "nceandamse",
        "cnn_cifar",
        120,
        0.01,
        128,
    )
    assert cfg.loss_params == {"alpha": 1.0, "beta": 1.0, "a": 30.0}
    assert (cfg.l1, cfg.l2) == (5e-5, 0.0)  # SPEC §1.6: L1 for AMSE on CIFAR-10, no L2
    assert cfg.noise_seed == cfg.seed


def test_explicit_values_win_over_the_profile():
    cfg = TrialConfig(dataset="cifar100", loss="jal_fl", loss_params={"a": 7}, l2=1e-3, epochs=3)
    cfg = cfg.resolve()
    assert cfg.loss_params == {"alpha": 5.0, "beta": 1.0, "a": 7.0, "gamma": 0.5}
    assert (cfg.epochs, cfg.l1, cfg.l2) == (3, 5e-6, 1e-3)


@pytest.mark.parametrize(
    ("dataset", "loss", "expected"),
    [
        ("cifar10", "nceandnnce", (5e-5, 0.0)),
        ("cifar10", "ce", (0.0, 1e-4)),
        ("cifar100", "nceandamse", (5e-6, 0.0)),
        ("cifar100", "nflandnnfl", (5e-7, 0.0)),
        ("cifar100", "gce", (0.0, 1e-5)),
        ("webvision", "nceandamse", (0.0, 3e-5)),
        ("clothing1m", "nceandamse", (0.0, 1e-3)),
    ],
)
def test_weight_decay_rule_of_spec(dataset, loss, expected):
    assert weight_decay(dataset, loss) == expected


def test_every_shipped_loss_table_entry_builds():
    # A typo in a table (a loss or parameter name) would otherwise surface mid-search.
    names = set(loss_names())
    for table in LOSS_TABLES.values():
        for loss, params in table.items():
            assert loss in names, loss
            build_loss(loss, 100, **params)


def test_shipped_jal_values_per_dataset():
    assert shipped_loss_params("webvision", "nflandamse") == {"alpha": 50.0, "beta": 1.0, "a": 30.0}
    assert shipped_loss_params("clothing1m", "nceandamse") == {"alpha": 5.0, "beta": 0.1, "a": 5.0}
    assert shipped_loss_params("mnist", "nceandamse") == shipped_loss_params(
        "cifar10", "nceandamse"
    )
    assert set(PROFILES) >= {"mnist", "digits", "cifar10", "cifar100", "webvision", "clothing1m"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"epochs": 0}, "train.epochs: Input should be greater than 0"),
        ({"val_labels": "dirty"}, "train.val_labels"),
        ({"colour": "red"}, "train.colour: Extra inputs are not permitted"),
        ({"val_fraction": 1.0}, "train.val_fraction"),
    ],
)
def test_bad_fields_are_named_in_one_line(data, message):
    with pytest.raises(UserError) as err:
        trial_config(data, where="train")
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_unknown_loss_parameter_names_the_valid_ones():
    with pytest.raises(UserError, match="has no parameter 'b'; valid: alpha, beta, a"):
        TrialConfig(loss="jal_ce", loss_params={"b": 1.0}).resolve()
    with pytest.raises(UserError, match="no training profile for 'svhn'"):
        TrialConfig(dataset="svhn").resolve()


def test_numbers_take_yaml_ints_and_text_but_counts_and_flags_are_strict():
    cfg = trial_config({"lr": 1, "l2": 0, "l1": "1e-5", "epochs": 3, "compile": False})
    assert (cfg.lr, cfg.l2, cfg.l1, cfg.epochs) == (1.0, 0.0, 1e-5, 3)  # YAML reads 1e-5 as text
    assert "compile" not in cfg.model_dump()  # recorded before it was removed: what runs now
    for data, message in [
        ({"epochs": 3.0}, "train.epochs: Input should be a valid integer"),
        ({"epochs": True}, "train.epochs: Input should be a valid integer"),
        ({"lr": True}, "train.lr: Value error, expected a number, not true/false"),
        ({"lr": float("inf")}, "train.lr: Input should be a finite number"),
        ({"loss_params": {"a": float("nan")}}, "train.loss_params.a: Input should be a finite"),
        ({"noise_rate": False}, "train.noise_rate: Value error, expected a finite number or a"),
        ({"compile": True}, "train.compile: no longer a setting (torch.compile made GPU"),
        ({"seed": 2**32}, "train.seed: Input should be less than 4294967296"),
        ({"noise_file": "a\0b"}, "train.noise_file: Value error, a path cannot hold a NUL"),
    ]:
        with pytest.raises(UserError) as err:
            trial_config(data, where="train")
        assert str(err.value).startswith(message), err.value


def test_documents_keep_merge_keys_and_read_dates_as_text():
    doc = parse_document("b: &b {x: 1, y: 2}\nc: {<<: *b, y: 3}\nd: 2001-02-30\n", "doc")
    assert doc == {"b": {"x": 1, "y": 2}, "c": {"x": 1, "y": 3}, "d": "2001-02-30"}


@pytest.mark.parametrize(
    ("text", "as_json", "message"),
    [
        ("a: 1\nb: 2\na: 3\n", False, "doc: key 'a' appears twice (lines 1 and 3); keep one"),
        ('{"a": 1, "a": 2}', True, "doc: key 'a' appears twice; keep one"),
        ("a: &a [*a]\n", False, "doc: nested deeper than 20 levels at a[0]"),
        ("[" * 10**5, False, "doc: nested deeper than 20 levels (line 1)"),
        ("[" * 10**5, True, "doc: nested deeper than 20 levels"),
        ("[" + "1," * 10**4 + "1]", False, "doc: more than 10,000 values"),
        ('{"a": Infinity}', True, "doc: Infinity is not a JSON number"),
        ("a: !!int 0x\n", False, "doc: not valid YAML (ValueError"),
        ('a: "\\0"\n', False, "doc: a holds a NUL character; remove it"),
    ],
)
def test_documents_beyond_the_bounds_are_one_line_errors(text, as_json, message):
    with pytest.raises(UserError) as err:
        parse_document(text, "doc", as_json=as_json)
    assert str(err.value).startswith(message), err.value


def test_an_alias_bomb_is_refused_in_a_bounded_walk():
    lines = ["a0: &a0 [x]"] + [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)
    ]
    began = time.perf_counter()
    with pytest.raises(UserError, match="more than 10,000 values"):
        parse_document("\n".join(lines), "doc")
    assert time.perf_counter() - began < 1  # 9^9 values if expanded; the walk stops at 10,000
