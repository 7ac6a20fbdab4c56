"""Losses against plain per-sample float64 versions of the SPEC §1.2-1.3 formulas, and AMSE's bound.

The reference formulas below are written from the SPEC text, one sample at a time, sharing no
code with `jal_search.losses`. Detached factors are detached here too, so autograd gives the
gradient the SPEC describes.
"""

import math

import numpy as np
import pytest
import torch

from jal_search.errors import UserError
from jal_search.losses import (
    amse_a_min,
    amse_a_min_from_matrix,
    build_loss,
    canonical_loss_name,
    loss_names,
    loss_parameters,
)

TOL = 1e-10  # float64; tighter than 1e-6 so the 1e-8 clamps are visible


# ----------------------------------------------------------------- reference per-sample formulas
def softmax(z):
    e = torch.exp(z - z.max())
    return e / e.sum()


def ce(z, y):
    return -torch.log(softmax(z)[y])


def focal(p_y, gamma):
    return -((1 - p_y.detach()) ** gamma) * torch.log(p_y)


def mae(z, y):
    return 1 - softmax(z)[y]


def amse(z, y, a):
    p, k = softmax(z), len(z)
    return sum((p[j] - (a if j == y else 0.0)) ** 2 for j in range(k)) / k


def gce(z, y, q):
    return (1 - torch.clamp(softmax(z)[y], 1e-8, 1) ** q) / q


def rce(z, y):
    p = torch.clamp(softmax(z), 1e-8, 1)
    return sum(-p[k] * math.log(1e-4) for k in range(len(z)) if k != y)


def nce(z, y):
    logp = torch.log(softmax(z))
    return -logp[y] / -logp.sum()


def nfl(z, y, gamma):
    p = softmax(z)
    terms = [focal(p[k], gamma) for k in range(len(z))]
    return terms[y] / sum(terms)


def agce(z, y, a, q):
    return ((a + 1) ** q - (a + softmax(z)[y]) ** q) / q


def aul(z, y, a, q):
    return ((a - softmax(z)[y]) ** q - (a - 1) ** q) / q


def ael(z, y, a):
    return torch.exp(-softmax(z)[y] / a)


def nnce(z, y, min_prob):
    big_a = -math.log(min_prob)
    s = big_a + torch.log(torch.clamp(softmax(z), min_prob, 1))
    return 1 - s[y] / s.sum()


def nnfl(z, y, gamma, min_prob):
    logp = torch.clamp(torch.log(softmax(z)), min=math.log(min_prob))
    f = [-((1 - torch.exp(logp[k]).detach()) ** gamma) * logp[k] for k in range(len(z))]
    big_a = -((1 - min_prob) ** gamma) * math.log(min_prob)
    return 1 - (big_a - f[y]) / (len(z) * big_a - sum(f))


def eps_softmax(z, m):
    p = softmax(z)
    bump = torch.zeros_like(p)
    bump[int(torch.argmax(p))] = m
    return torch.clamp((p + bump) / (m + 1), min=1e-8)


def ce_lc(z, y, delta):
    norm = torch.sqrt((z**2).sum()) + 1e-8
    if norm > 1 / delta:
        z = z / norm * delta
    return -torch.log(torch.clamp(softmax(z), 1e-8, 1)[y])


def ldr(z, y, threshold, lam):
    sp = torch.log1p(torch.exp(z))
    s = sp / sp.mean()
    d = torch.stack([threshold * (k != y) + s[k] - s[y] for k in range(len(z))])
    return lam * torch.log(torch.exp(d / lam).mean())


def nfl_g(P):
    return lambda z, y: nfl(z, y, P["gamma"])


REF = {
    "ce": lambda z, y, P: ce(z, y),
    "fl": lambda z, y, P: focal(softmax(z)[y], P["gamma"]),
    "mae": lambda z, y, P: P["scale"] * mae(z, y),
    "mse": lambda z, y, P: amse(z, y, 1.0),
    "gce": lambda z, y, P: gce(z, y, P["q"]),
    "sce": lambda z, y, P: P["alpha"] * ce(z, y) + P["beta"] * rce(z, y),
    "rce": lambda z, y, P: P["scale"] * rce(z, y),
    "nce": lambda z, y, P: P["scale"] * nce(z, y),
    "nfl": lambda z, y, P: P["scale"] * nfl(z, y, P["gamma"]),
    "agce": lambda z, y, P: P["scale"] * agce(z, y, P["a"], P["q"]),
    "aul": lambda z, y, P: P["scale"] * aul(z, y, P["a"], P["q"]),
    "ael": lambda z, y, P: P["scale"] * ael(z, y, P["a"]),
    "amse": lambda z, y, P: P["scale"] * amse(z, y, P["a"]),
    "nceandmae": lambda z, y, P: P["alpha"] * nce(z, y) + P["beta"] * mae(z, y),
    "nceandrce": lambda z, y, P: P["alpha"] * nce(z, y) + P["beta"] * rce(z, y),
    "nflandrce": lambda z, y, P: P["alpha"] * nfl(z, y, P["gamma"]) + P["beta"] * rce(z, y),
    "nflandmae": lambda z, y, P: P["alpha"] * nfl(z, y, P["gamma"]) + P["beta"] * mae(z, y),
    "nceandagce": lambda z, y, P: P["alpha"] * nce(z, y) + P["beta"] * agce(z, y, P["a"], P["q"]),
    "nceandaul": lambda z, y, P: P["alpha"] * nce(z, y) + P["beta"] * aul(z, y, P["a"], P["q"]),
    "nceandael": lambda z, y, P: P["alpha"] * nce(z, y) + P["beta"] * ael(z, y, P["a"]),
    "nflandagce": lambda z, y, P: (
        P["alpha"] * nfl(z, y, P["gamma"]) + P["beta"] * agce(z, y, P["a"], P["q"])
    ),
    "nflandaue": lambda z, y, P: (
        P["alpha"] * nfl(z, y, P["gamma"]) + P["beta"] * aul(z, y, P["a"], P["q"])
    ),
    "nflandael": lambda z, y, P: P["alpha"] * nfl(z, y, P["gamma"]) + P["beta"] * ael(z, y, P["a"]),
    "agceandmae": lambda z, y, P: P["alpha"] * agce(z, y, P["a"], P["q"]) + P["beta"] * mae(z, y),
    "nnce": lambda z, y, P: nnce(z, y, P["min_prob"]),
    "nnfl": lambda z, y, P: nnfl(z, y, P["gamma"], P["min_prob"]),
    "nceandnnce": lambda z, y, P: P["alpha"] * nce(z, y) + P["beta"] * nnce(z, y, P["min_prob"]),
    "nflandnnfl": lambda z, y, P: (
        P["alpha"] * nfl(z, y, P["gamma"]) + P["beta"] * nnfl(z, y, P["gamma"], P["min_prob"])
    ),
    "ldr": lambda z, y, P: ldr(z, y, P["threshold"], P["Lambda"]),
    "ceandlc": lambda z, y, P: ce_lc(z, y, P["delta"]),
    # eps-softmax pairs keep MAE at scale 2: beta * 2(1 - p_y)
    "eceandmae": lambda z, y, P: (
        -P["alpha"] * torch.log(eps_softmax(z, P["m"])[y]) + P["beta"] * 2 * mae(z, y)
    ),
    "eflandmae": lambda z, y, P: (
        P["alpha"] * focal(eps_softmax(z, P["m"])[y], P["gamma"]) + P["beta"] * 2 * mae(z, y)
    ),
    "nceandamse": lambda z, y, P: P["alpha"] * nce(z, y) + P["beta"] * amse(z, y, P["a"]),
    "nflandamse": lambda z, y, P: (
        P["alpha"] * nfl(z, y, P["gamma"]) + P["beta"] * amse(z, y, P["a"])
    ),
}

# Non-default values, with alpha != beta so a swapped weight shows.
CUSTOM = {
    "ce": {},
    "fl": {"gamma": 1.7},
    "mae": {"scale": 0.6},
    "mse": {},
    "gce": {"q": 0.4},
    "sce": {"alpha": 0.1, "beta": 2.3},
    "rce": {"scale": 0.4},
    "nce": {"scale": 3.0},
    "nfl": {"gamma": 1.3, "scale": 2.0},
    "agce": {"a": 0.6, "q": 0.6, "scale": 1.5},
    "aul": {"a": 5.5, "q": 3.0, "scale": 0.7},
    "ael": {"a": 2.5, "scale": 1.2},
    "amse": {"a": 7.0, "scale": 0.3},
    "nceandmae": {"alpha": 10.0, "beta": 0.1},
    "nceandrce": {"alpha": 2.0, "beta": 0.3},
    "nflandrce": {"alpha": 2.0, "beta": 0.3, "gamma": 1.1},
    "nflandmae": {"alpha": 2.0, "beta": 0.3, "gamma": 0.2},
    "nceandagce": {"alpha": 1.0, "beta": 4.0, "a": 6.0, "q": 1.5},
    "nceandaul": {"alpha": 10.0, "beta": 0.015, "a": 6.3, "q": 3.0},
    "nceandael": {"alpha": 10.0, "beta": 0.1, "a": 1.5},
    "nflandagce": {"alpha": 0.5, "beta": 2.0, "a": 1e-5, "q": 0.5, "gamma": 0.9},
    "nflandaue": {"alpha": 0.5, "beta": 2.0, "a": 3.0, "q": 1.2, "gamma": 0.9},
    "nflandael": {"alpha": 0.5, "beta": 2.0, "a": 4.0, "gamma": 0.9},
    "agceandmae": {"alpha": 0.5, "beta": 2.0, "a": 2.0, "q": 2.5},
    "nnce": {"min_prob": 1e-7},
    "nnfl": {"gamma": 1.5, "min_prob": 1e-7},
    "nceandnnce": {"alpha": 10.0, "beta": 1.0, "min_prob": 1e-7},
    "nflandnnfl": {"alpha": 10.0, "beta": 1.0, "gamma": 0.7, "min_prob": 1e-7},
    "ldr": {"threshold": 0.5, "Lambda": 10.0},
    "ceandlc": {"delta": 0.5},
    "eceandmae": {"alpha": 0.5, "beta": 1.5, "m": 3.0},
    "eflandmae": {"alpha": 0.5, "beta": 1.5, "m": 3.0, "gamma": 0.6},
    "nceandamse": {"alpha": 5.0, "beta": 0.1, "a": 5.0},
    "nflandamse": {"alpha": 50.0, "beta": 0.7, "a": 20.0, "gamma": 0.3},
}


def batch(k=5, seed=0, dtype=torch.float64):
    """Logits that exercise every branch: clamps at 1e-8, argmax on and off y, small norms."""
    g = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(7, k, generator=g, dtype=dtype)
    y = torch.randint(0, k, (7,), generator=g)
    y[:4] = torch.tensor([0, 1, 2, k - 1])
    z[0, 0] = -25.0  # p_y < 1e-8: GCE / NNCE / eps clamps
    z[1, 1], z[1, 0] = 15.0, -12.0  # p_y ~ 1, a wrong p_k < 1e-8: RCE / NNCE clamps
    z[2] *= 0.02  # ||z|| < 1/delta: CEandLC leaves it unclipped
    return z, y


def reference(name, z, y, params):
    return torch.stack([REF[name](z[i], int(y[i]), params) for i in range(len(y))]).mean()


def value_and_grad(fn, z):
    leaf = z.clone().requires_grad_(True)
    value = fn(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


# ------------------------------------------------------------------------ values and gradients
def test_reference_covers_every_loss():
    assert set(REF) == set(loss_names()) == set(CUSTOM)


@pytest.mark.parametrize("setting", ["default", "custom"])
@pytest.mark.parametrize("name", loss_names())
def test_value_and_gradient_match_spec(name, setting):
    params = loss_parameters(name)
    if setting == "custom":
        params.update(CUSTOM[name])
    z, y = batch()
    loss = build_loss(name, z.shape[1], **params)
    got, got_grad = value_and_grad(lambda t: loss(t, y), z)
    want, want_grad = value_and_grad(lambda t: reference(name, t, y, params), z)
    assert got.ndim == 0
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
    torch.testing.assert_close(got_grad, want_grad, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("name", loss_names())
def test_float32_tracks_float64(name):
    # float32 in, float32 out, close to the float64 reference on moderate logits.
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 4, generator=g, dtype=torch.float32)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    loss = build_loss(name, 4)
    got, grad = value_and_grad(lambda t: loss(t, y), z)
    assert got.dtype == grad.dtype == torch.float32
    want = reference(name, z.double(), y, loss_parameters(name))
    assert abs(got.double() - want) <= 1e-4 * max(1.0, abs(float(want)))


@pytest.mark.parametrize("name", loss_names())
def test_runs_on_other_devices_without_item(name, monkeypatch):
    # The meta device catches hard-coded CPU tensors; a patched .item() catches host syncs.
    def no_item(self):
        raise AssertionError(".item() called in forward")

    monkeypatch.setattr(torch.Tensor, "item", no_item)
    out = build_loss(name, 6)(
        torch.randn(3, 6, device="meta"), torch.zeros(3, dtype=torch.long, device="meta")
    )
    assert out.device.type == "meta" and out.ndim == 0


def test_combined_loss_takes_one_softmax(monkeypatch):
    calls = []
    real = torch.nn.functional.log_softmax

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "log_softmax", counting)
    monkeypatch.setattr(torch.nn.functional, "softmax", lambda *a, **k: pytest.fail("softmax"))
    z, y = batch()
    for name in ("nflandamse", "nceandamse", "nflandnnfl", "nflandrce"):
        calls.clear()
        build_loss(name, 5)(z, y)
        assert len(calls) == 1, name


def test_aul_works_for_many_classes():
    # Upstream one-hot-encoded with K=10 and crashed on labels >= 10.
    g = torch.Generator().manual_seed(2)
    z = torch.randn(8, 100, generator=g, dtype=torch.float64)
    y = torch.tensor([10, 42, 99, 57, 3, 11, 98, 64])
    for name in ("aul", "nceandaul", "nflandaue"):
        params = loss_parameters(name)
        got = build_loss(name, 100)(z, y)
        torch.testing.assert_close(got, reference(name, z, y, params), rtol=TOL, atol=TOL)


def test_amse_is_mean_over_all_entries_and_mse_is_a_equal_1():
    z, y = batch(k=6, seed=3)
    p = torch.softmax(z, dim=1)
    target = torch.zeros_like(p)
    target[torch.arange(len(y)), y] = 4.5
    want = 0.8 * ((p - target) ** 2).mean()  # mean over N*K entries, times scale
    torch.testing.assert_close(build_loss("amse", 6, a=4.5, scale=0.8)(z, y), want)
    torch.testing.assert_close(build_loss("mse", 6)(z, y), build_loss("amse", 6, a=1)(z, y))


def test_amse_decomposition():
    # AMSE = (a/K)||e_y - p||_1 + (1/K)||p||^2 + (a^2 - 2a)/K   (SPEC §1.2); gradients too.
    k, a = 7, 5.3
    z, y = batch(k=k, seed=4)

    def rhs(t):
        sq_norm = (torch.softmax(t, dim=1) ** 2).sum(dim=1).mean()
        return a / k * build_loss("mae", k, scale=2)(t, y) + sq_norm / k + (a * a - 2 * a) / k

    got, got_grad = value_and_grad(lambda t: build_loss("amse", k, a=a)(t, y), z)
    want, want_grad = value_and_grad(rhs, z)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-12)


def test_jal_defaults_are_the_shipped_cifar10_setting():
    assert loss_parameters("jal_ce") == {"alpha": 1.0, "beta": 1.0, "a": 30.0}
    assert loss_parameters("jal_fl") == {"alpha": 1.0, "beta": 1.0, "a": 30.0, "gamma": 0.5}


@pytest.mark.parametrize(
    ("name", "defaults"),
    [  # code defaults of SPEC §1.3
        ("fl", {"gamma": 0.5}),
        ("mae", {"scale": 2.0}),
        ("gce", {"q": 0.7}),
        ("sce", {"alpha": 1.0, "beta": 1.0}),
        ("agce", {"a": 1.0, "q": 2.0, "scale": 1.0}),
        ("aul", {"a": 1.5, "q": 0.9, "scale": 1.0}),
        ("ael", {"a": 3.0, "scale": 1.0}),
        ("nceandagce", {"alpha": 1.0, "beta": 1.0, "a": 3.0, "q": 1.5}),
        ("nceandaul", {"alpha": 1.0, "beta": 1.0, "a": 6.0, "q": 1.5}),
        ("nceandael", {"alpha": 1.0, "beta": 4.0, "a": 2.5}),
        ("nnce", {"min_prob": 1e-8}),
        ("ldr", {"threshold": 0.1, "Lambda": 1.0}),
    ],
)
def test_code_defaults(name, defaults):
    assert loss_parameters(name) == defaults


# ---------------------------------------------------------------------------- names and errors
@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("JAL_CE", "nceandamse"),
        ("jal-ce", "nceandamse"),
        ("jal_fl", "nflandamse"),
        ("ANL-CE", "nceandnnce"),
        ("anl_fl", "nflandnnfl"),
        ("LDR-KL", "ldr"),
        ("NCEandAUE", "nceandaul"),
        ("NCEandAMSE", "nceandamse"),
        ("CE", "ce"),
    ],
)
def test_aliases_and_case(alias, canonical):
    assert canonical_loss_name(alias) == canonical
    z, y = batch()
    torch.testing.assert_close(build_loss(alias, 5)(z, y), build_loss(canonical, 5)(z, y))


def test_unknown_loss_names_the_valid_ones():
    with pytest.raises(UserError, match=r"unknown loss 'foo'; valid: ce, fl, .*nceandamse.*jal_ce"):
        build_loss("foo", 10)
    with pytest.raises(UserError, match="unknown loss 'bar'"):
        loss_parameters("bar")


def test_unknown_parameter_names_the_valid_ones():
    with pytest.raises(
        UserError, match=r"loss 'jal_ce' has no parameter 'b'; valid: alpha, beta, a$"
    ):
        build_loss("jal_ce", 10, b=1.0)
    # SCE takes the paper's alpha/beta, not upstream's a/b.
    with pytest.raises(UserError, match=r"no parameter 'a'; valid: alpha, beta$"):
        build_loss("sce", 10, a=0.1)
    with pytest.raises(UserError, match=r"loss 'ce' has no parameter 'scale'; valid: \(none\)"):
        build_loss("ce", 10, scale=1.0)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("amse", {"a": 0.5}, "'a' must be a number >= 1"),
        ("jal_ce", {"a": 0.0}, "'a' must be a number >= 1"),
        ("aul", {"a": 1.0}, "'a' must be a number > 1"),
        ("gce", {"q": 1.5}, r"'q' must be a number in \(0, 1\]"),
        ("gce", {"q": 0.0}, r"'q' must be a number in \(0, 1\]"),
        ("jal_fl", {"alpha": -1.0}, "'alpha' must be a number >= 0"),
        ("sce", {"beta": -0.1}, "'beta' must be a number >= 0"),
        ("fl", {"gamma": -0.5}, "'gamma' must be a number >= 0"),
        ("agce", {"a": -0.1}, "'a' must be a number >= 0"),
        ("agce", {"q": 0.0}, "'q' must be a number > 0"),
        ("ael", {"a": 0.0}, "'a' must be a number > 0"),
        ("ldr", {"Lambda": 0.0}, "'Lambda' must be a number > 0"),
        ("nnce", {"min_prob": 1.0}, r"'min_prob' must be a number in \(0, 1\)"),
        ("ceandlc", {"delta": 0.0}, "'delta' must be a number > 0"),
        ("eceandmae", {"m": -1.0}, "'m' must be a number >= 0"),
        ("mae", {"scale": float("nan")}, "'scale' must be a number"),
        ("jal_ce", {"a": "30"}, "'a' must be a number"),
        ("jal_ce", {"alpha": True}, "'alpha' must be a number"),
    ],
)
def test_out_of_range_values(name, params, message):
    with pytest.raises(UserError, match=message):
        build_loss(name, 10, **params)


def test_bad_num_classes_and_shapes():
    with pytest.raises(UserError, match="num_classes"):
        build_loss("ce", 1)
    with pytest.raises(UserError, match="num_classes"):
        build_loss("ce", 2.5)
    with pytest.raises(ValueError, match=r"logits must be \[N, 10\]"):
        build_loss("ce", 10)(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must be \[3\]"):
        build_loss("ce", 5)(torch.zeros(3, 5), torch.zeros(4, dtype=torch.long))


def test_user_error_is_a_value_error():
    with pytest.raises(ValueError):
        build_loss("nope", 10)


# -------------------------------------------------------------------------------- AMSE's bound
@pytest.mark.parametrize(
    ("noise", "rate", "k", "want"),
    [  # SPEC §2.4, rounded to 2 decimals as the SPEC prints them
        ("symmetric", 0.2, 10, 1.29),
        ("symmetric", 0.4, 10, 1.80),
        ("symmetric", 0.6, 10, 3.00),
        ("symmetric", 0.8, 10, 9.00),
        ("symmetric", 0.2, 100, 1.25),
        ("symmetric", 0.4, 100, 1.68),
        ("symmetric", 0.6, 100, 2.54),
        ("symmetric", 0.8, 100, 5.21),
        ("asymmetric", 0.1, 10, 1.25),
        ("asymmetric", 0.2, 100, 1.67),
        ("asymmetric", 0.3, 10, 2.50),
        ("asymmetric", 0.4, 100, 5.00),
    ],
)
def test_a_min_table(noise, rate, k, want):
    assert round(amse_a_min(noise, rate, k), 2) == want


def test_a_min_exact_and_edge_cases():
    assert amse_a_min("symmetric", 0.8, 10) == pytest.approx(9.0, abs=1e-12)
    assert amse_a_min("Symmetric", 0.8, 100) == pytest.approx(99 / 19, abs=1e-12)
    assert amse_a_min("asymmetric", 0.4, 10) == pytest.approx(5.0, abs=1e-12)
    assert amse_a_min("clean", 0.0, 10) == 1.0
    for noise in ("symmetric", "asymmetric", "dependent", "human"):
        assert amse_a_min(noise, 0.0, 10) == 1.0
    assert amse_a_min("symmetric", 0.9, 10) == math.inf  # eta = (K-1)/K: no dominance
    assert amse_a_min("symmetric", 0.95, 10) == math.inf
    assert amse_a_min("asymmetric", 0.5, 10) == math.inf
    assert amse_a_min("asymmetric", 0.7, 10) == math.inf


def test_a_min_without_closed_form_points_to_the_matrix_version():
    for noise in ("dependent", "human", "custom"):
        with pytest.raises(UserError, match="amse_a_min_from_matrix"):
            amse_a_min(noise, 0.4, 10)
    with pytest.raises(UserError, match="noise rate"):
        amse_a_min("symmetric", 1.5, 10)
    with pytest.raises(UserError, match="num_classes"):
        amse_a_min("symmetric", 0.2, 1)


def symmetric_matrix(rate, k):
    return (1 - rate) * np.eye(k) + rate / (k - 1) * (np.ones((k, k)) - np.eye(k))


def pair_flip_matrix(rate, k):
    return (1 - rate) * np.eye(k) + rate * np.roll(np.eye(k), 1, axis=1)


@pytest.mark.parametrize("k", [10, 100])
@pytest.mark.parametrize("rate", [0.0, 0.2, 0.45, 0.8, 0.95])
def test_matrix_bound_agrees_with_closed_forms(rate, k):
    sym = amse_a_min("symmetric", rate, k)
    assert amse_a_min_from_matrix(symmetric_matrix(rate, k)) == pytest.approx(sym, rel=1e-9)
    pair = amse_a_min("asymmetric", rate, k)
    assert amse_a_min_from_matrix(pair_flip_matrix(rate, k)) == pytest.approx(pair, rel=1e-9)


def test_matrix_bound_takes_the_worst_row():
    t = np.array([[0.9, 0.1, 0.0], [0.2, 0.6, 0.2], [0.05, 0.05, 0.9]])
    want = max(1 / (t[y, y] - max(t[y, k] for k in range(3) if k != y)) for y in range(3))
    assert amse_a_min_from_matrix(t) == pytest.approx(want)  # row 1: 1 / 0.4
    t[1] = [0.4, 0.4, 0.2]  # the clean label no longer dominates
    assert amse_a_min_from_matrix(t) == math.inf


def test_matrix_bound_validates_the_matrix():
    with pytest.raises(UserError, match="square"):
        amse_a_min_from_matrix(np.ones((2, 3)) / 3)
    with pytest.raises(UserError, match="row 1 sums to 0.9"):
        amse_a_min_from_matrix(np.array([[1.0, 0.0], [0.1, 0.8]]))
    with pytest.raises(UserError, match="non-negative"):
        amse_a_min_from_matrix(np.array([[1.2, -0.2], [0.0, 1.0]]))


# ------------------------------------------------------------------------- the theory, numerically
def project_to_simplex(v):
    """Euclidean projection onto {u >= 0, sum u = 1} (sort-based)."""
    s = np.sort(v)[::-1]
    cums = np.cumsum(s) - 1
    rho = np.nonzero(s - cums / np.arange(1, len(v) + 1) > 0)[0][-1]
    return np.maximum(v - cums[rho] / (rho + 1), 0)


def weighted_amse_minimiser(w, a, steps=300, lr=1.0):
    """Projected gradient descent on sum_k w_k * (1/K)||a e_k - u||^2 over the simplex."""
    k = len(w)
    u = np.full(k, 1 / k)
    for _ in range(steps):
        grad = sum(w[j] * 2 * (u - a * np.eye(k)[j]) / k for j in range(k))
        u = project_to_simplex(u - lr * grad)
    return u


def test_weighted_objective_is_the_implemented_amse():
    # sum_k w_k AMSE_a(u, k) from the module equals the objective the optimiser minimises.
    k, a = 10, 9.5
    w = np.array([0.2] + [0.8 / 9] * 9)
    u = np.random.default_rng(5).dirichlet(np.ones(k))
    loss = build_loss("amse", k, a=a)
    logits = torch.tensor(np.log(u))[None]
    module = sum(w[j] * float(loss(logits, torch.tensor([j]))) for j in range(k))
    direct = sum(w[j] * np.sum((a * np.eye(k)[j] - u) ** 2) / k for j in range(k))
    assert module == pytest.approx(direct, rel=1e-12)


def test_vertex_minimiser_appears_exactly_above_a_min():
    # K=10, symmetric eta=0.8: the clean weight 0.2 dominates 0.8/9 and a_min = 9 (SPEC §2.3).
    w = np.array([0.2] + [0.8 / 9] * 9)
    u = weighted_amse_minimiser(w, 9.5)
    assert u[0] == pytest.approx(1.0, abs=1e-9)  # the clean one-hot: asymmetric
    u = weighted_amse_minimiser(w, 8.5)
    assert u[0] < 0.99  # interior: the noisy labels pull the minimiser off the vertex
    assert u[0] == pytest.approx(0.95, abs=1e-6)  # projection of 8.5*w, derived by hand
    a_min = amse_a_min("symmetric", 0.8, 10)
    assert weighted_amse_minimiser(w, 1.01 * a_min)[0] == pytest.approx(1.0, abs=1e-9)
    assert weighted_amse_minimiser(w, 0.99 * a_min)[0] < 1 - 1e-3
