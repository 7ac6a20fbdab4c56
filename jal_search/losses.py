"""Every loss of SPEC §1.2-1.3 by name, and AMSE's lower bound on `a` (SPEC §2.3-2.4).

Notation: p = softmax(z), p_y = p[y], K classes, sg(.) = detached (no gradient), p~ = clamp(p,
1e-8, 1). Every loss returns the batch mean of the per-sample value below.

    ce           -log p_y
    fl           -sg(1-p_y)^gamma * log p_y
    mae          scale * (1 - p_y)                 (scale 2 gives ||e_y - p||_1)
    mse, amse    scale * (1/K) * ||a*e_y - p||^2   (mse: a = 1, scale = 1; mean over N*K entries)
    gce          (1 - p~_y^q) / q
    rce          scale * (-ln 1e-4) * sum_{k!=y} p~_k
    sce          alpha*CE + beta*RCE               (upstream names these weights `a` and `b`)
    nce          scale * log p_y / sum_k log p_k
    nfl          scale * sg(1-p_y)^gamma log p_y / sum_k sg(1-p_k)^gamma log p_k
    agce         scale * ((a+1)^q - (a+p_y)^q) / q
    aul          scale * ((a-p_y)^q - (a-1)^q) / q
    ael          scale * exp(-p_y / a)
    nnce         1 - s_y / sum_k s_k,  s_k = -ln(min_prob) + max(log p_k, ln min_prob)
    nnfl         1 - (A - F_y) / (K*A - sum_k F_k),  l = max(log p, ln min_prob),
                 F_k = -sg(1-e^l_k)^gamma * l_k,  A = -(1-min_prob)^gamma * ln(min_prob)
    ldr          Lambda * log mean_k exp(d_k/Lambda),  d_k = threshold*[k!=y] + s_k - s_y,
                 s = softplus(z) / mean_k softplus(z)   (LDR-KL)
    ceandlc      CE on clamp(softmax(z'), 1e-8); z' = delta*z/n if n = ||z||+1e-8 > 1/delta,
                 else z. Upstream's quirk, kept: clipped logits get norm delta, not 1/delta.
    eceandmae    alpha*CE_eps + beta*2(1-p_y);  eflandmae: alpha*FL_eps + beta*2(1-p_y);
                 CE_eps / FL_eps are CE / FL on p'_y = max((p_y + m*[y = argmax p]) / (m+1), 1e-8)
    XandY        alpha*X + beta*Y with X, Y as above at scale 1; the MAE term of nceandmae,
                 nflandmae and agceandmae is beta*(1-p_y) (APL convention), not beta*2(1-p_y).
                 One gamma serves both terms of nflandnnfl (as in ANL).

Aliases: jal_ce = nceandamse (JAL-CE), jal_fl = nflandamse (JAL-FL), anl_ce = nceandnnce,
anl_fl = nflandnnfl, ldr_kl = ldr, nceandaue = nceandaul. Names ignore case and '-' vs '_'.
AMSE decomposes per sample as (a/K)*||e_y - p||_1 + (1/K)*||p||^2 + (a^2 - 2a)/K: a scaled MAE
with weight a/K, a small term favouring flat outputs, and a constant that does not move gradients.

Defaults are upstream's. Where upstream has none or a meaningless one (AMSE's a = 0, which
breaks a >= 1; the NNCE/NNFL pairs; CEandLC; the eps-softmax pairs) the CIFAR-10 config value is
the default, so `build_loss("jal_ce", 10)` is the shipped CIFAR-10 JAL-CE. Upstream's AUL one-hot
used a fixed K = 10 (crashing on CIFAR-100); here it works for any K. NLNL is out of scope: it
needs the training loader's class counts.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jal_search.errors import UserError

EPS = 1e-8  # upstream's module-level clamp constant
_RCE_A = -math.log(1e-4)  # RCE clamps the one-hot at 1e-4, so log 0 becomes ln 1e-4


class _Batch:
    """One forward's inputs; softmax quantities are computed at most once and shared by terms."""

    def __init__(self, logits: Tensor, targets: Tensor) -> None:
        self.logits = logits
        self.targets = targets
        self._index = targets.unsqueeze(1)

    def at_y(self, x: Tensor) -> Tensor:
        """The labelled-class column of an [N, K] tensor, as [N]."""
        return x.gather(1, self._index).squeeze(1)

    @cached_property
    def log_probs(self) -> Tensor:
        return F.log_softmax(self.logits, dim=1)

    @cached_property
    def probs(self) -> Tensor:
        return self.log_probs.exp()

    @cached_property
    def log_p_y(self) -> Tensor:
        return self.at_y(self.log_probs)

    @cached_property
    def p_y(self) -> Tensor:
        return self.at_y(self.probs)

    @cached_property
    def one_hot(self) -> Tensor:
        return F.one_hot(self.targets, self.logits.shape[1]).to(self.logits.dtype)


# Per-sample terms: (batch, parameters) -> Tensor[N]. A loss is a weighted sum of terms.
TermFn = Callable[[_Batch, Mapping[str, float]], Tensor]


def _focal(log_pt: Tensor, gamma: float) -> Tensor:
    # The focal factor is computed from detached values (upstream's `.data`).
    return -((1 - log_pt.detach().exp()) ** gamma) * log_pt


def _sq_dist(b: _Batch, a: float) -> Tensor:
    return (b.probs - a * b.one_hot).square().mean(dim=1)


def _eps_log_p_y(b: _Batch, m: float) -> Tensor:
    """log p'_y of eps-softmax: m is added to the argmax entry, then renormalised and clamped."""
    hit = (b.probs.argmax(dim=1) == b.targets).to(b.p_y.dtype)
    return ((b.p_y + m * hit) / (m + 1)).clamp(min=EPS).log()


def _ce(b: _Batch, P: Mapping[str, float]) -> Tensor:
    return -b.log_p_y


def _fl(b: _Batch, P: Mapping[str, float]) -> Tensor:
    return _focal(b.log_p_y, P["gamma"])


def _mae(b: _Batch, P: Mapping[str, float]) -> Tensor:
    return 1 - b.p_y


def _l1(b: _Batch, P: Mapping[str, float]) -> Tensor:
    """||e_y - p||_1: the eps-softmax pairs keep MAELoss's default scale 2."""
    return 2 * (1 - b.p_y)


def _mse(b: _Batch, P: Mapping[str, float]) -> Tensor:
    return _sq_dist(b, 1.0)


def _amse(b: _Batch, P: Mapping[str, float]) -> Tensor:
    return _sq_dist(b, P["a"])


def _gce(b: _Batch, P: Mapping[str, float]) -> Tensor:
    q = P["q"]
    return (1 - b.p_y.clamp(EPS, 1) ** q) / q


def _rce(b: _Batch, P: Mapping[str, float]) -> Tensor:
    p = b.probs.clamp(EPS, 1)
    return _RCE_A * (p.sum(dim=1) - b.at_y(p))


def _nce(b: _Batch, P: Mapping[str, float]) -> Tensor:
    return b.log_p_y / b.log_probs.sum(dim=1)


def _nfl(b: _Batch, P: Mapping[str, float]) -> Tensor:
    weighted = (1 - b.probs.detach()) ** P["gamma"] * b.log_probs
    return b.at_y(weighted) / weighted.sum(dim=1)


def _agce(b: _Batch, P: Mapping[str, float]) -> Tensor:
    a, q = P["a"], P["q"]
    return ((a + 1) ** q - (a + b.p_y) ** q) / q


def _aul(b: _Batch, P: Mapping[str, float]) -> Tensor:
    a, q = P["a"], P["q"]
    return ((a - b.p_y) ** q - (a - 1) ** q) / q


def _ael(b: _Batch, P: Mapping[str, float]) -> Tensor:
    return (-b.p_y / P["a"]).exp()


def _nnce(b: _Batch, P: Mapping[str, float]) -> Tensor:
    log_min = math.log(P["min_prob"])
    s = b.log_probs.clamp(min=log_min) - log_min
    return 1 - b.at_y(s) / s.sum(dim=1)


def _nnfl(b: _Batch, P: Mapping[str, float]) -> Tensor:
    gamma, min_prob = P["gamma"], P["min_prob"]
    log_p = b.log_probs.clamp(min=math.log(min_prob))
    f = _focal(log_p, gamma)
    a = -((1 - min_prob) ** gamma) * math.log(min_prob)
    return 1 - (a - b.at_y(f)) / (log_p.shape[1] * a - f.sum(dim=1))


def _ece(b: _Batch, P: Mapping[str, float]) -> Tensor:
    return -_eps_log_p_y(b, P["m"])


def _efl(b: _Batch, P: Mapping[str, float]) -> Tensor:
    return _focal(_eps_log_p_y(b, P["m"]), P["gamma"])


def _ce_lc(b: _Batch, P: Mapping[str, float]) -> Tensor:
    # LogitClip changes the logits, so this term needs its own softmax.
    delta = P["delta"]
    norms = b.logits.norm(dim=1, keepdim=True) + EPS
    logits = torch.where(norms > 1 / delta, delta * b.logits / norms, b.logits)
    return -b.at_y(logits.softmax(dim=1).clamp(EPS, 1)).log()


def _ldr(b: _Batch, P: Mapping[str, float]) -> Tensor:
    lam = P["Lambda"]
    s = F.softplus(b.logits)
    s = s / s.mean(dim=1, keepdim=True)
    d = (P["threshold"] * (1 - b.one_hot) + s - b.at_y(s).unsqueeze(1)) / lam
    shift = d.max(dim=1, keepdim=True).values.detach()  # for stability only
    return lam * ((d - shift).exp().mean(dim=1).log() + shift.squeeze(1))


# ----------------------------------------------------------------------------- parameter ranges
@dataclass(frozen=True)
class _Range:
    low: float
    low_open: bool = False
    high: float = math.inf
    high_open: bool = False

    def __contains__(self, x: float) -> bool:
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        lo, hi = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {lo}{self.low:g}, {self.high:g}{hi}"


_NONNEG = _Range(0.0)  # weights (alpha, beta, scale) and gamma
_POS = _Range(0.0, low_open=True)
_REAL = _Range(-math.inf, low_open=True)
_GCE_Q = _Range(0.0, low_open=True, high=1.0)
_AMSE_A = _Range(1.0)  # a < 1 fails a(w_m - w_n) >= 1 even without noise (SPEC §2.3)
_AUL_A = _Range(1.0, low_open=True)  # a - p_y must stay positive
_MIN_PROB = _Range(0.0, low_open=True, high=1.0, high_open=True)


@dataclass(frozen=True)
class _LossDef:
    terms: tuple[tuple[str | None, TermFn], ...]  # (weight parameter, None = weight 1; term)
    params: dict[str, tuple[float, _Range]]  # name -> (default, valid range), in display order


def _def(*terms: tuple[str | None, TermFn], **params: tuple[float, _Range]) -> _LossDef:
    return _LossDef(terms, params)


def _pair(
    first: TermFn, second: TermFn, alpha: float = 1.0, beta: float = 1.0, **params: tuple
) -> _LossDef:
    """alpha * first + beta * second."""
    weights = {"alpha": (alpha, _NONNEG), "beta": (beta, _NONNEG)}
    return _def(("alpha", first), ("beta", second), **weights, **params)


_GAMMA = (0.5, _NONNEG)
_MIN_P = (1e-8, _MIN_PROB)
_JAL_A = (30.0, _AMSE_A)  # CIFAR-10 config; upstream's class default a=0 is meaningless

_LOSSES: dict[str, _LossDef] = {
    "ce": _def((None, _ce)),
    "fl": _def((None, _fl), gamma=_GAMMA),
    "mae": _def(("scale", _mae), scale=(2.0, _NONNEG)),
    "mse": _def((None, _mse)),
    "gce": _def((None, _gce), q=(0.7, _GCE_Q)),
    "sce": _pair(_ce, _rce),
    "rce": _def(("scale", _rce), scale=(1.0, _NONNEG)),
    "nce": _def(("scale", _nce), scale=(1.0, _NONNEG)),
    "nfl": _def(("scale", _nfl), gamma=_GAMMA, scale=(1.0, _NONNEG)),
    "agce": _def(("scale", _agce), a=(1.0, _NONNEG), q=(2.0, _POS), scale=(1.0, _NONNEG)),
    "aul": _def(("scale", _aul), a=(1.5, _AUL_A), q=(0.9, _POS), scale=(1.0, _NONNEG)),
    "ael": _def(("scale", _ael), a=(3.0, _POS), scale=(1.0, _NONNEG)),
    "amse": _def(("scale", _amse), a=_JAL_A, scale=(1.0, _NONNEG)),
    "nceandmae": _pair(_nce, _mae),
    "nceandrce": _pair(_nce, _rce),
    "nflandrce": _pair(_nfl, _rce, gamma=_GAMMA),
    "nflandmae": _pair(_nfl, _mae, gamma=_GAMMA),
    "nceandagce": _pair(_nce, _agce, a=(3.0, _NONNEG), q=(1.5, _POS)),
    "nceandaul": _pair(_nce, _aul, a=(6.0, _AUL_A), q=(1.5, _POS)),
    "nceandael": _pair(_nce, _ael, beta=4.0, a=(2.5, _POS)),
    "nflandagce": _pair(_nfl, _agce, a=(3.0, _NONNEG), q=(2.0, _POS), gamma=_GAMMA),
    "nflandaue": _pair(_nfl, _aul, a=(1.5, _AUL_A), q=(0.9, _POS), gamma=_GAMMA),
    "nflandael": _pair(_nfl, _ael, a=(3.0, _POS), gamma=_GAMMA),
    "agceandmae": _pair(_agce, _mae, a=(3.0, _NONNEG), q=(1.5, _POS)),
    "nnce": _def((None, _nnce), min_prob=_MIN_P),
    "nnfl": _def((None, _nnfl), gamma=_GAMMA, min_prob=_MIN_P),
    "nceandnnce": _pair(_nce, _nnce, alpha=5.0, beta=5.0, min_prob=_MIN_P),
    "nflandnnfl": _pair(_nfl, _nnfl, alpha=5.0, beta=5.0, gamma=_GAMMA, min_prob=_MIN_P),
    "ldr": _def((None, _ldr), threshold=(0.1, _REAL), Lambda=(1.0, _POS)),
    "ceandlc": _def((None, _ce_lc), delta=(2.5, _POS)),
    "eceandmae": _pair(_ece, _l1, alpha=0.01, beta=5.0, m=(1e5, _NONNEG)),
    "eflandmae": _pair(_efl, _l1, alpha=0.01, beta=5.0, m=(1e5, _NONNEG), gamma=(0.1, _NONNEG)),
    "nceandamse": _pair(_nce, _amse, a=_JAL_A),
    "nflandamse": _pair(_nfl, _amse, a=_JAL_A, gamma=_GAMMA),
}

_ALIASES = {
    "jal_ce": "nceandamse",
    "jal_fl": "nflandamse",
    "anl_ce": "nceandnnce",
    "anl_fl": "nflandnnfl",
    "ldr_kl": "ldr",
    "nceandaue": "nceandaul",
    "aue": "aul",
    "nflandaul": "nflandaue",
}


# ------------------------------------------------------------------------------------ public API
def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise UserError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if num_classes < 2:
        raise UserError(f"num_classes must be an integer >= 2, got {num_classes}")


def loss_names() -> list[str]:
    """Canonical (lower-case) loss names, in registry order."""
    return list(_LOSSES)


def loss_aliases() -> dict[str, str]:
    """Alias -> canonical name."""
    return dict(_ALIASES)


def canonical_loss_name(name: str) -> str:
    """Resolve case, '-' vs '_', and aliases (jal_ce -> nceandamse); UserError if unknown."""
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _LOSSES:
        raise UserError(
            f"unknown loss {name!r}; valid: {', '.join(_LOSSES)} (aliases: {', '.join(_ALIASES)})"
        )
    return key


def loss_parameters(name: str) -> dict[str, float]:
    """The loss's parameter names with their defaults (without building it)."""
    return {k: default for k, (default, _) in _LOSSES[canonical_loss_name(name)].params.items()}


class Loss(nn.Module):
    """A registry loss: sum of weighted per-sample terms over one shared softmax, batch mean."""

    def __init__(self, name: str, num_classes: int, params: Mapping[str, float]) -> None:
        super().__init__()
        self.name = name
        self.num_classes = num_classes
        self.params = dict(params)
        self._terms = _LOSSES[name].terms

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"{self.name}: logits must be [N, {self.num_classes}], got {list(logits.shape)}"
            )
        if targets.shape != logits.shape[:1]:
            raise ValueError(
                f"{self.name}: targets must be [{logits.shape[0]}], got {list(targets.shape)}"
            )
        batch = _Batch(logits, targets)
        per_sample = sum(
            (1.0 if w is None else self.params[w]) * term(batch, self.params)
            for w, term in self._terms
        )
        return per_sample.mean()

    def extra_repr(self) -> str:
        values = "".join(f", {k}={v:g}" for k, v in self.params.items())
        return f"{self.name}, num_classes={self.num_classes}{values}"


def build_loss(name: str, num_classes: int, **params: float) -> Loss:
    """The loss `name` for `num_classes` classes; unspecified parameters take their defaults.

    UserError on an unknown name, an unknown parameter, or a value outside the valid range.
    """
    canon = canonical_loss_name(name)
    _check_num_classes(num_classes)
    spec = _LOSSES[canon].params
    values = {k: default for k, (default, _) in spec.items()}
    for key, value in params.items():
        if key not in spec:
            raise UserError(
                f"loss {name!r} has no parameter {key!r}; valid: {', '.join(spec) or '(none)'}"
            )
        ok = not isinstance(value, bool) and isinstance(value, numbers.Real)
        if not ok or not math.isfinite(value) or value not in spec[key][1]:
            raise UserError(
                f"loss {name!r}: parameter {key!r} must be a number {spec[key][1]}, got {value!r}"
            )
        values[key] = float(value)
    return Loss(canon, int(num_classes), values)


# --------------------------------------------------------------------------- AMSE's bound on a
def amse_a_min(noise_type: str, rate: float, num_classes: int) -> float:
    """Smallest `a` for which AMSE is asymmetric under a closed-form noise model (SPEC §2.4).

    From a*(w_m - w_n) >= 1 with w_m the clean-label probability and w_n the largest wrong one:
    clean (or rate 0) -> 1; symmetric -> (K-1)/(K-1-K*rate), inf once rate >= (K-1)/K;
    asymmetric (pair flip, one target class per class) -> 1/(1-2*rate), inf once rate >= 0.5.
    `rate` is the flip probability of a noisy class. Other noise models have no closed form.
    """
    kind = str(noise_type).strip().lower()
    if kind == "clean":
        return 1.0
    _check_num_classes(num_classes)
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate <= 1:
        raise UserError(f"noise rate must be a number in [0, 1], got {rate!r}")
    if kind == "symmetric":
        margin = num_classes - 1 - num_classes * rate
        return (num_classes - 1) / margin if margin > 0 else math.inf
    if kind == "asymmetric":
        margin = 1 - 2 * rate
        return 1 / margin if margin > 0 else math.inf
    if rate == 0:  # no noise, whatever the model
        return 1.0
    raise UserError(
        f"noise type {noise_type!r} has no closed-form a_min (only clean, symmetric, asymmetric); "
        "use amse_a_min_from_matrix on the realised transition matrix"
    )


def amse_a_min_from_matrix(T: np.ndarray) -> float:
    """Class-level a_min from a row-stochastic transition matrix T[true, noisy] (SPEC §2.4).

    max over rows y of S_y / (T_yy - max_{k!=y} T_yk), with S_y the row sum (1); inf if any row
    lacks clean-label dominance. Only approximates the per-instance condition: instance-level
    dominance can fail where class-level dominance holds.
    """
    t = np.asarray(T, dtype=np.float64)
    if t.ndim != 2 or t.shape[0] != t.shape[1] or t.shape[0] < 2:
        raise UserError(f"transition matrix must be square K x K with K >= 2, got {t.shape}")
    if not np.isfinite(t).all() or (t < 0).any():
        raise UserError("transition matrix entries must be finite and non-negative")
    sums = t.sum(axis=1)
    if not np.allclose(sums, 1.0, rtol=0, atol=1e-6):
        bad = int(np.argmax(np.abs(sums - 1)))
        raise UserError(f"transition matrix rows must sum to 1; row {bad} sums to {sums[bad]:g}")
    off = t.copy()
    np.fill_diagonal(off, -np.inf)
    margin = np.diag(t) - off.max(axis=1)
    if (margin <= 0).any():
        return math.inf
    return float((sums / margin).max())
