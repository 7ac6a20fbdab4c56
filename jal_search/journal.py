"""Each trial's own record on the experiment's storage, written by the trial alone.

    <experiment>/<setting>/<trial>/
        journal.jsonl           line 1, the header: the trial's name, setting, sampled parameters
                                and resolved config (every knob filled), versions, first start
                                time, number of starts; then one line per epoch: what
                                `train.run_trial` reports, with the noisy labels' hash, the node,
                                the start that trained it and a timestamp
        checkpoint-<epoch>/     the newest two training states (`train.save_checkpoint`)

A pack (spec `pack: K`) keeps its shared checkpoints in its own folder and one journal per member
in `<trial>-m<k>/`.

Order per epoch: the row is appended and flushed to disk, then the checkpoint is written, then Tune
hears of the epoch. A restarted trial resumes from its newest readable checkpoint and first cuts
its journal back to that checkpoint's epoch, so a journal always holds exactly the epochs of the
run that produced the trial's latest state, and Tune's own files hold nothing we need.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

JOURNAL = "journal.jsonl"
LOCK = ".lock"  # held by the one process that writes the trial (`sole_writer`)
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINTS_KEPT = 2  # the newest, plus one to fall back to if the newest is damaged


@contextlib.contextmanager
def sole_writer(folder: Path, wait_s: float = 300.0) -> Iterator[None]:
    """Hold a trial folder's lock while a trial writes to it.

    A worker orphaned by a killed driver (or cut off with its node) can still be finishing an
    epoch when the trial starts again elsewhere; two writers would interleave their rows. The
    lock is released by the kernel when its holder exits, so the new start waits for the old
    one to be gone (at most `wait_s`; then it fails, and Tune retries it).
    """
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "w") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    message = f"{folder}: another process still writes this trial"
                    raise TimeoutError(message) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_journal(folder: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """A journal's header and epoch rows (one per epoch, in order); a half-written last line, as
    a kill mid-append leaves it, is ignored. No journal: (None, [])."""
    try:
        lines = (folder / JOURNAL).read_text().splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return None, []
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    if not entries or "header" not in entries[0]:
        return None, []
    rows = [e for e in entries[1:] if isinstance(e.get("epoch"), int | float)]
    return entries[0]["header"], rows


class Journal:
    """Appends one trial's rows; `open` first cuts it back to the epochs its state holds."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.start = 0  # this run of the trial: 1 for its first start, 2 after one restart, …

    def open(self, header: dict[str, Any], epochs: int) -> None:
        """Start the journal with `header`, or keep an existing one's header and its rows up to
        `epochs` (the epoch of the state training resumes from; 0 for a fresh start). The header
        counts the trial's `starts`; each row names the start that trained it."""
        old, rows = read_journal(self.folder)
        first = old or header
        self.start = int(first.get("starts", 0)) + 1
        # Rewritten whole, so a line half-written by a kill is gone before the next append.
        kept = (r for r in rows if r["epoch"] <= epochs)
        entries = [{"header": {**first, "starts": self.start}}, *kept]
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{JOURNAL}.tmp"
        tmp.write_text("".join(json.dumps(e) + "\n" for e in entries))
        os.replace(tmp, self.folder / JOURNAL)

    def append(self, row: dict[str, Any]) -> None:
        """Append one epoch's row and flush it to disk before returning."""
        with open(self.folder / JOURNAL, "a") as handle:
            handle.write(json.dumps({**row, "start": self.start, "timestamp": time.time()}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


class Checkpoints:
    """A trial's (or a pack's) newest training states, `checkpoint-<epoch>/` in its folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def latest(self) -> dict[str, Any] | None:
        """The newest readable state; None if there is none. A damaged one costs its epochs, not
        the trial: a warning names it and the one before is used."""
        from jal_search.train import CheckpointError, load_checkpoint

        numbered = self._numbered()
        for i, folder in enumerate(numbered, 1):
            try:
                return load_checkpoint(folder)
            except CheckpointError as err:
                then = "the one before it" if i < len(numbered) else "epoch 0"
                warnings.warn(f"{err}; restarting the trial from {then}", stacklevel=2)
        return None

    def save(self, state: dict[str, Any]) -> None:
        """Write the state after `state["epoch"]`, then drop all but the newest CHECKPOINTS_KEPT."""
        from jal_search.train import save_checkpoint

        save_checkpoint(state, self.folder / f"{CHECKPOINT_PREFIX}{int(state['epoch']):06d}")
        for old in self._numbered()[CHECKPOINTS_KEPT:]:
            shutil.rmtree(old, ignore_errors=True)

    def _numbered(self) -> list[Path]:
        """Checkpoint folders, newest first."""
        found = []
        for p in self.folder.glob(f"{CHECKPOINT_PREFIX}*"):
            number = p.name.removeprefix(CHECKPOINT_PREFIX)
            if number.isdigit():
                found.append((int(number), p))
        return [p for _, p in sorted(found, reverse=True)]
