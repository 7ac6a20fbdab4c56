"""One trial's configuration: what `train.run_trial` runs, a search samples and export writes.

A `TrialConfig` may leave training knobs unset (None): `resolve()` fills them from the dataset's
profile and the paper's shipped loss parameters, so a resolved config is complete and
self-contained — rerunning it needs nothing else. Unknown keys are errors, never ignored.

Imports neither torch nor Ray: the search spec and the CLI's fast paths use it too.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from jal_search.errors import UserError
from jal_search.profiles import get_profile, shipped_loss_params, weight_decay

VALIDATION_SEED = (
    42  # the held-out split is the same for every trial and seed (as ANL's tuning split)
)
SUBSET_SEED = 0  # a train subset is part of the dataset's definition: fixed across trials and seeds


class TrialConfig(BaseModel):
    """One training run. `seed` drives model init, batch order and augmentation, and — unless
    `noise_seed` is set — the noisy labels (as upstream, which builds data after seeding)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = "mnist"
    data_root: str | None = None  # None: the embedded/system copy where one exists
    train_subset: int | None = Field(None, gt=0)  # use this many training images (seeded subset)
    noise_type: str = "clean"  # clean | symmetric | asymmetric | dependent | human | custom
    noise_rate: float | str = 0.0  # a rate in [0, 1]; for human noise the label-set key
    noise_file: str | None = None  # label file for dependent/human noise
    loss: str = "jal_ce"
    loss_params: dict[str, float] = Field(default_factory=dict)  # over the shipped defaults
    model: str | None = None
    epochs: int | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0)
    l1: float | None = Field(None, ge=0)  # coefficient of Σ|θ| added to the loss
    l2: float | None = Field(None, ge=0)  # SGD weight decay
    val_fraction: float = Field(0.1, ge=0, lt=1)
    val_labels: Literal["noisy", "clean"] = "noisy"
    seed: int = 123
    noise_seed: int | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = Field(None, gt=0)  # torch intra-op threads; None leaves torch's default
    # bf16: the model's forward under bf16 autocast (weights, loss and optimiser stay fp32);
    # auto: the profile's choice where the device runs bf16 fast, else fp32 (train.check_precision).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False  # torch.compile the model (for CUDA; measured slower on CPU)

    @field_validator("dataset", "loss", "noise_type")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower()

    @property
    def noise_name(self) -> str:
        """A filesystem- and MLflow-safe id of the noise setting, e.g. `symmetric-0.4`."""
        from jal_search.noise import NoiseSetting

        return NoiseSetting(self.noise_type, self.noise_rate).name

    def resolve(self) -> TrialConfig:
        """A copy with every None training knob filled from the profile and the loss tables."""
        from jal_search.losses import canonical_loss_name, loss_parameters

        profile = get_profile(self.dataset)
        loss = canonical_loss_name(self.loss)
        valid = loss_parameters(loss)
        unknown = sorted(set(self.loss_params) - set(valid))
        if unknown:
            raise UserError(
                f"loss_params: loss {loss!r} has no parameter {unknown[0]!r}; "
                f"valid: {', '.join(valid) or '(none)'}"
            )
        params = {**valid, **shipped_loss_params(self.dataset, loss), **self.loss_params}
        l1, l2 = weight_decay(self.dataset, loss)
        return self.model_copy(
            update={
                "loss": loss,
                "loss_params": params,
                "model": self.model or profile.model,
                "epochs": self.epochs or profile.epochs,
                "lr": self.lr or profile.lr,
                "batch_size": self.batch_size or profile.batch_size,
                "l1": l1 if self.l1 is None else self.l1,
                "l2": l2 if self.l2 is None else self.l2,
                "noise_seed": self.seed if self.noise_seed is None else self.noise_seed,
            }
        )


def trial_config(data: dict[str, Any], where: str = "config") -> TrialConfig:
    """Validate a dict into a TrialConfig; errors become one-line UserErrors naming the field."""
    try:
        return TrialConfig.model_validate(data)
    except ValidationError as err:
        raise UserError(one_line(err, where)) from None


def one_line(err: ValidationError, where: str) -> str:
    """The first pydantic error as `where.field: message (got value)`."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in (where, *first["loc"]) if p != "")
    got = first.get("input")
    secret = "uri" in str(first["loc"][-1]) if first["loc"] else False  # may hold credentials
    shown = "" if isinstance(got, dict) or secret else f" (got {got!r})"
    return f"{field}: {first['msg']}{shown}"
