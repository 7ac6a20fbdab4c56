"""One trial's configuration: what `train.run_trial` runs, a search samples and export writes.

A `TrialConfig` may leave training knobs unset (None): `resolve()` fills them from the dataset's
profile and the paper's shipped loss parameters, so a resolved config is complete and
self-contained — rerunning it needs nothing else. Unknown keys are errors, never ignored.

Also the one reader of user documents (specs, exported configs): `read_document` turns any file
into plain data or a one-line UserError; and the field types of user input (`Number`,
`NumberOrName`, `Seed`, `PathText`, with pydantic's StrictInt) that every model of
user input uses.

Imports neither torch nor Ray: the search spec and the CLI's fast paths use it too.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from jal_search.errors import UserError
from jal_search.profiles import get_profile, shipped_loss_params, weight_decay

VALIDATION_SEED = (
    42  # the held-out split is the same for every trial and seed (as ANL's tuning split)
)
SUBSET_SEED = 0  # a train subset is part of the dataset's definition: fixed across trials and seeds
DEFAULT_SEED = 123  # a trial's seed (and its noisy labels') unless a spec or a flag sets one

# Bounds on a user document. A spec is ~1 KB with a few dozen values, an export ~1 KB per setting;
# the bounds keep a hostile file (a YAML alias bomb, nesting 10^5 deep) to milliseconds and MBs.
MAX_DOCUMENT_BYTES = 1 << 20
MAX_VALUES = 10_000  # keys and values, YAML aliases counted once per use
MAX_DEPTH = 20
# Path texts stay under PATH_MAX (4096) with room for what is appended to them, and every
# component under NAME_MAX (255), so the OS reports no error that is not about the file itself.
MAX_PATH_BYTES = 4000
MAX_NAME_BYTES = 255


def _not_bool(value: Any) -> Any:
    # pydantic's lax float takes `true` as 1.0; YAML also reads yes/no/on/off as booleans.
    if isinstance(value, bool):
        raise ValueError("expected a number, not true/false")
    return value


def check_path_text(text: str) -> str:
    """`text` if the OS can take it as a path; otherwise a ValueError that says why."""
    if "\0" in text:
        raise ValueError("a path cannot hold a NUL character")
    try:
        encoded = os.fsencode(text)
    except UnicodeEncodeError:
        raise ValueError("not encodable as a file name on this system") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise ValueError(f"a path of {len(encoded)} bytes; at most {MAX_PATH_BYTES}")
    if max(len(part) for part in encoded.split(b"/")) > MAX_NAME_BYTES:
        raise ValueError(f"a path component longer than {MAX_NAME_BYTES} bytes")
    if text.startswith("~") and os.path.expanduser(text) == text:
        raise ValueError(f"{text.split('/')[0]}: no such user here; give the full path")
    return text


def _number_or_name(value: Any) -> Any:
    # checked before the union, so that an error names the field, not the union's members
    finite = isinstance(value, int | str) or (isinstance(value, float) and math.isfinite(value))
    if isinstance(value, bool) or not finite:
        raise ValueError("expected a finite number or a name")
    return value


# Field types of user input. Numbers are finite and never booleans, but a YAML int is a fine
# float; counts and seeds are whole numbers as written (`true`, 2.0 and "2" are refused).
Number = Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False)]
Seed = Annotated[StrictInt, Field(ge=0, lt=2**32)]  # numpy's and Optuna's seed range
PathText = Annotated[str, AfterValidator(check_path_text)]
NumberOrName = Annotated[float | str, BeforeValidator(_number_or_name)]  # a rate or a label set


class TrialConfig(BaseModel):
    """One training run. `seed` drives model init, batch order and augmentation, and — unless
    `noise_seed` is set — the noisy labels (as upstream, which builds data after seeding)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = "mnist"
    data_root: PathText | None = None  # None: the embedded/system copy where one exists
    train_subset: StrictInt | None = Field(None, gt=0)  # use this many training images (seeded)
    noise_type: str = "clean"  # clean | symmetric | asymmetric | dependent | human | custom
    noise_rate: NumberOrName = 0.0  # a rate in [0, 1]; for human noise the label-set key
    noise_file: PathText | None = None  # label file for dependent/human noise
    loss: str = "jal_ce"
    loss_params: dict[str, Number] = Field(default_factory=dict)  # over the shipped defaults
    model: str | None = None
    epochs: StrictInt | None = Field(None, gt=0)
    lr: Number | None = Field(None, gt=0)
    batch_size: StrictInt | None = Field(None, gt=0)
    l1: Number | None = Field(None, ge=0)  # coefficient of Σ|θ| added to the loss
    l2: Number | None = Field(None, ge=0)  # SGD weight decay
    val_fraction: Number = Field(0.1, ge=0, lt=1)
    val_labels: Literal["noisy", "clean"] = "noisy"
    seed: Seed = DEFAULT_SEED
    noise_seed: Seed | None = None  # None: `seed` (see `labels_seed`)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: StrictInt | None = Field(None, gt=0)  # torch intra-op threads; None: torch's default
    # bf16: the model's forward under bf16 autocast (weights, loss and optimiser stay fp32);
    # auto: the profile's choice where the device runs bf16 fast, else fp32 (train.check_precision).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Epochs evaluated on the test set besides the last (`metrics.evaluates_test_set`); None:
    # every epoch.
    test_epochs: tuple[StrictInt, ...] | None = None

    @model_validator(mode="before")
    @classmethod
    def _recorded_compile(cls, data: Any) -> Any:
        # `compile` was a field until issue 14, and configs recorded before (exports, results,
        # recorded streams) hold `compile: false`: what runs now, so it is dropped. Anything else
        # stays an unknown key; `trial_config` says why for user documents.
        if isinstance(data, dict) and data.get("compile", True) is False:
            return {k: v for k, v in data.items() if k != "compile"}
        return data

    @field_validator("dataset", "loss", "noise_type")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower()

    @property
    def noise_name(self) -> str:
        """A filesystem- and MLflow-safe id of the noise setting, e.g. `symmetric-0.4`."""
        from jal_search.noise import NoiseSetting

        return NoiseSetting(self.noise_type, self.noise_rate).name

    @property
    def labels_seed(self) -> int:
        """The seed of the trial's noisy labels: `noise_seed`, else the trial's own `seed`."""
        return self.seed if self.noise_seed is None else self.noise_seed

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
                "noise_seed": self.labels_seed,
            }
        )


def trial_config(data: dict[str, Any], where: str = "config") -> TrialConfig:
    """Validate a dict into a TrialConfig; errors become one-line UserErrors naming the field."""
    if data.get("compile", False) is not False:  # see TrialConfig._recorded_compile
        raise UserError(
            f"{where}.compile: no longer a setting (torch.compile made GPU epochs slower; on "
            "CUDA each step now runs as a CUDA graph without it): remove it"
        )
    try:
        return TrialConfig.model_validate(data)
    except ValidationError as err:
        raise UserError(one_line(err, where)) from None


def one_line(err: ValidationError, where: str) -> str:
    """The first pydantic error as `where.field: message (got value)`, the value cut short."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in (where, *first["loc"]) if p != "")
    got = first.get("input")
    secret = "uri" in str(first["loc"][-1]) if first["loc"] else False  # may hold credentials
    shown = "" if isinstance(got, dict) or secret else f" (got {_cut(repr(got))})"
    return f"{field}: {first['msg']}{shown}"


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def load_exported(path: str | Path, setting: str | None = None) -> TrialConfig:
    """The resolved TrialConfig of one setting of an export file (`setting` may be omitted when
    the file holds one). Hand edits are validated: a bad field is a one-line UserError."""
    path = Path(path)
    doc = read_document(path, "--config")
    settings = doc.get("settings") if isinstance(doc, dict) else None
    if not isinstance(settings, dict) or not settings:
        raise UserError(f"{path}: not a jal-search export (no `settings` mapping); see `export`")
    available = ", ".join(str(name) for name in settings)
    if setting is None:
        if len(settings) > 1:
            raise UserError(f"{path}: holds several settings; choose --setting: {available}")
        setting = next(iter(settings))
    if setting not in settings:
        raise UserError(f"--setting: {path} has no setting {setting!r}; available: {available}")
    entry = settings[setting]
    where = f"{path.name}:settings.{setting}.config"
    if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
        raise UserError(f"{where}: missing; re-export the experiment")
    return trial_config(entry["config"], where=where).resolve()


# ------------------------------------------------------------------------------ user documents
def read_document(path: Path, label: str) -> Any:
    """The data of a YAML file (JSON for a .json suffix), or a one-line UserError.

    Total on any file: too big, not a regular file, not UTF-8, not parseable, duplicate keys,
    nested or (after YAML aliases) sized beyond the bounds above, or strings holding NUL. `label`
    names the input in errors about the file itself (`--config: cannot read …`).
    """
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block the read forever
            raise UserError(f"{label}: {path} is not a regular file")
        with path.open("rb") as file:
            data = file.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as err:
        raise UserError(f"{label}: cannot read {path} ({err.strerror})") from None
    if len(data) > MAX_DOCUMENT_BYTES:
        raise UserError(f"{path}: over {MAX_DOCUMENT_BYTES:,} bytes; is it the right file?")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    return parse_document(text, str(path), as_json=path.suffix.lower() == ".json")


def parse_document(text: str, where: str, as_json: bool = False) -> Any:
    """`read_document` for text in memory; `where` starts every error message."""
    try:
        doc = parse_json(text) if as_json else yaml.load(text, Loader=_StrictLoader)
    except _Refused as err:
        raise UserError(f"{where}: {err}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not valid JSON at line {err.lineno} ({err.msg})") from None
    except RecursionError:  # the JSON parser recurses once per level
        raise UserError(f"{where}: nested deeper than {MAX_DEPTH} levels") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{where}: not valid YAML{at}; check indentation and colons") from None
    except MemoryError:
        raise
    except Exception as err:
        # PyYAML's errors without a line, and values its constructors cannot build, raised as
        # whatever they happen to be: `!!timestamp 2001-02-30` a ValueError, `!!bool maybe` a
        # KeyError, an int of 5,000 digits a ValueError.
        kind = "JSON" if as_json else "YAML"
        problem = _cut(f"{type(err).__name__}: {' '.join(str(err).split())}")
        raise UserError(f"{where}: not valid {kind} ({problem})") from None
    _check_values(doc, where)
    return doc


class _Refused(ValueError):
    """A document refused while parsing, with the line where it was found."""

    def __init__(self, problem: str, mark: Any = None) -> None:
        super().__init__(problem + (f" (line {mark.line + 1})" if mark is not None else ""))


_TOO_MANY = f"more than {MAX_VALUES:,} values (YAML aliases count once per use); write it out"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and stops composing beyond the size and depth
    bounds (PyYAML's composer recurses once per level)."""

    def compose_document(self) -> Any:
        self._values, self._depth = 0, 0
        return super().compose_document()

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._values += 1
        self._depth += 1
        try:
            if self._values > MAX_VALUES:
                raise _Refused(_TOO_MANY, self.peek_event().start_mark)
            if self._depth > MAX_DEPTH:
                raise _Refused(
                    f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue  # merge keys (`<<: *base`) may repeat what they merge in
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise _Refused(
                    f"key {key!r} appears twice (lines {lines[key]} and {line}); keep one"
                )
            lines[key] = line
        return super().construct_mapping(node, deep)


# Dates stay text: no field is a date, and PyYAML's implicit dates raise on `2001-02-30`.
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if not tag.endswith(":timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def parse_json(text: str) -> Any:
    """json.loads, refusing duplicate keys and NaN/Infinity (ValueError; RecursionError when
    nested ~1,000 deep). Sizes are the caller's to bound."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise _Refused(f"key {key!r} appears twice; keep one")
            out[key] = value
        return out

    def constant(name: str) -> Any:
        raise _Refused(f"{name} is not a JSON number; write a finite number")

    return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)


def _check_values(doc: Any, where: str) -> None:
    """Refuse a document too large or deep once YAML aliases are expanded (they can nest and
    refer to themselves), or holding a NUL character. The walk stops at the first bound crossed,
    so an alias bomb costs at most MAX_VALUES steps."""
    todo: list[tuple[Any, int, str]] = [(doc, 1, "")]  # value, depth, where in the document
    count = 0
    while todo:
        value, depth, place = todo.pop()
        count += 1
        if depth > MAX_DEPTH:
            raise UserError(f"{where}: nested deeper than {MAX_DEPTH} levels at {place}")
        if isinstance(value, str) and "\0" in value:
            raise UserError(f"{where}: {place or 'the document'} holds a NUL character; remove it")
        if isinstance(value, dict | list | tuple | set | frozenset):
            # every value queued is counted when popped: refuse before queueing too many
            if count + len(todo) + len(value) * (2 if isinstance(value, dict) else 1) > MAX_VALUES:
                raise UserError(f"{where}: {_TOO_MANY}")
            if isinstance(value, dict):
                for key, item in value.items():
                    here = _cut(f"{place}.{key}" if place else str(key), 200)
                    todo += [(key, depth + 1, here), (item, depth + 1, here)]
            else:
                todo += [(item, depth + 1, f"{place}[{i}]") for i, item in enumerate(value)]
