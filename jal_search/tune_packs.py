"""Pack workers: a search's trials trained up to K at a time in shared processes (spec `pack: K`).

Part of the Ray adapter (`tune_adapter` and the `tune_*` modules, the only ones that import Ray).

Every trial stays a Tune trial: suggested by its setting's searcher, stopped by ASHA, journaled in
its own folder, tracked as its own MLflow run. Tune runs it as a thin client (`member_trainable`:
no CPU, 1 MiB of memory, no torch) attached to a `PackWorker`, a Ray actor that holds the real
resources (`resources:` sizes each worker) and a `packed.PackTrainer` with K slots.

Per epoch the worker trains every member whose client has asked for its next epoch, as one pack
(each member at its own epoch), appends each member's journal row, writes its checkpoint (its own:
`PackTrainer.state`) in its trial folder, then hands the row to its client, which reports it to
Tune. A trial ASHA stops, or one that ends, leaves its slot; the next trial attached takes it at
the next epoch boundary, at its own epoch 0 (or its checkpoint's). Before each epoch the worker
waits briefly for clients to come back from Tune's decisions and for slots just freed to be
taken again (`_settle`), so a pack does not run part-empty for want of a few milliseconds.

Failures: a worker that dies takes its clients' trials with it (their `next` raises); Ray
restarts it, Tune retries them (FailureConfig), and each attaches again, to whichever worker has a
free slot, from its own checkpoint. A member that fails alone (e.g. an unusable checkpoint) fails
its own trial only.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune

from jal_search.experiment import SETTING, TRIAL, ended, sampled, trial_header
from jal_search.journal import Checkpoints, Journal, sole_writer
from jal_search.spec import SearchSpec, SettingPlan

# Tune refuses a trial that asks for nothing; a client needs neither a CPU nor a GPU share.
CLIENT_RESOURCES = {"cpu": 0, "memory": 1 << 20}
# Before an epoch: how long after a member left or joined to wait for a free slot to be taken
# again, and how long at most for clients still waiting on Tune's decision.
REFILL_S = 0.3
STRAGGLERS_S = 2.0
ATTACH_RETRY_S = 0.05  # every worker full: a slot frees when a trial ends or is stopped


@dataclass
class _Slot:
    """One attached trial in a worker."""

    params: dict[str, Any]  # its Tune config: SETTING, TRIAL and the sampled parameters
    client: str  # which run of its client attached it (a retried trial's is another)
    lock: contextlib.ExitStack  # its folder's `sole_writer`, held while attached
    member: int | None = None  # its key in the trainer, once joined
    epochs: int = 0  # its budget, once joined
    journal: Journal | None = None
    checkpoints: Checkpoints | None = None
    wants: bool = False  # its client asked for its next epoch
    leaving: bool = False  # detached: leaves at the next boundary
    ended: bool = False  # ran its budget or diverged: nothing more to train
    rows: list[dict[str, Any]] = field(default_factory=list)  # trained, not yet handed out
    error: BaseException | None = None


class PackWorker:
    """A Ray actor training up to `capacity` attached trials as one pack (see the module's
    docstring). Its methods run on Ray's threads; the training runs on one thread of its own."""

    def __init__(
        self,
        capacity: int,
        plans: dict[str, SettingPlan],
        experiment_dir: str,
        trainer: Callable[[Any], Any] | None = None,
    ) -> None:
        """`trainer(config)` builds the pack trainer (None: `packed.PackTrainer`; the tests give
        a scripted one with its interface)."""
        self.capacity, self.plans, self.folder = capacity, plans, Path(experiment_dir)
        self._make_trainer = trainer
        self._slots: dict[str, _Slot] = {}
        self._cv = threading.Condition()
        self._changed = 0.0  # when a trial last joined or left (time.monotonic)
        self._trainer: Any = None  # packed.PackTrainer, built with the first member
        self._node, self._pid = ray.get_runtime_context().get_node_id(), os.getpid()
        threading.Thread(target=self._train, daemon=True, name="pack").start()

    def attach(self, params: dict[str, Any], client: str) -> bool:
        """Take a slot for a trial (False: none is free). A trial already attached (its client
        died and Tune retried it) leaves first and starts again from its checkpoint."""
        key = _key(params)
        with self._cv:
            if key in self._slots:
                self._slots[key].leaving = True
                self._cv.notify_all()
                self._cv.wait_for(lambda: key not in self._slots)
            if len(self._slots) >= self.capacity:
                return False
        lock = contextlib.ExitStack()  # may wait for a writer orphaned by a killed driver
        lock.enter_context(sole_writer(self.folder / params[SETTING] / params[TRIAL]))
        with self._cv:
            if len(self._slots) >= self.capacity:
                lock.close()
                return False
            self._slots[key] = _Slot(params, client, lock)
            self._changed = time.monotonic()
            self._cv.notify_all()
        return True

    def next(self, key: str, client: str) -> dict[str, Any]:
        """The trial's next epoch's journal row, once trained (or its last one, if it had
        already ended before it attached)."""
        with self._cv:
            slot = self._slots.get(key)
            if slot is None or slot.client != client:
                raise RuntimeError(f"{key}: not attached to this worker (it may have restarted)")
            if not slot.rows and slot.error is None:
                if slot.ended:
                    raise RuntimeError(f"{key}: the trial has ended; there is no next epoch")
                slot.wants = True
                self._cv.notify_all()
            self._cv.wait_for(lambda: slot.rows or slot.error is not None)
            if slot.error is not None:
                raise slot.error
            return slot.rows.pop(0)

    def detach(self, key: str, client: str) -> None:
        """The trial ended, or was stopped: it leaves at the next epoch boundary. (From a client
        run that is no longer the trial's, e.g. one the worker's restart cut off: ignored.)"""
        with self._cv:
            slot = self._slots.get(key)
            if slot is not None and slot.client == client:
                slot.leaving = True
                self._cv.notify_all()

    # ---------------------------------------------------------------- the training thread

    def _train(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(self._due)
                self._settle()
                slots = dict(self._slots)
            for key, slot in slots.items():
                if slot.leaving:
                    self._leave(key, slot)
                elif slot.member is None and slot.error is None:
                    self._join(slot)
            ready = [
                s
                for s in slots.values()
                if s.wants and not (s.leaving or s.ended) and s.error is None
            ]
            if ready:
                self._epoch(ready)

    def _due(self) -> bool:
        return any(s.leaving or s.wants for s in self._slots.values())  # wants: no error, not ended

    def _settle(self) -> None:
        """Wait (at most STRAGGLERS_S) until no client is still waiting on Tune's decision, and
        (at most REFILL_S after a trial left or joined) for free slots to be taken."""
        deadline = time.monotonic() + STRAGGLERS_S
        while True:
            now = time.monotonic()
            deciding = any(
                not (s.wants or s.leaving or s.ended or s.error) for s in self._slots.values()
            )
            refill_until = self._changed + REFILL_S
            refilling = len(self._slots) < self.capacity and now < refill_until
            if now >= deadline or not (deciding or refilling):
                return
            self._cv.wait(timeout=(min(deadline, refill_until) if refilling else deadline) - now)

    def _join(self, slot: _Slot) -> None:
        from jal_search.packed import PackTrainer

        make = self._make_trainer or PackTrainer
        params = slot.params
        folder = self.folder / params[SETTING] / params[TRIAL]
        try:
            config = self.plans[params[SETTING]].trial(sampled(params)).resolve()
            slot.checkpoints = Checkpoints(folder)
            resume = slot.checkpoints.latest()
            slot.journal = Journal(folder)
            slot.journal.open(trial_header(params, config), int(resume["epoch"]) if resume else 0)
            if self._trainer is None:
                self._trainer = make(config)
            slot.member, slot.epochs = self._trainer.add(config, resume), config.epochs
        except Exception as err:  # this trial's own failure (an unusable config or checkpoint)
            self._deliver(slot, error=err)
            return
        last = resume["history"][-1] if resume and resume["history"] else None
        if resume is not None and ended(last, config.epochs):
            self._deliver(slot, row=last)  # ended before the driver heard: say how, once more

    def _leave(self, key: str, slot: _Slot) -> None:
        if slot.member is not None and self._trainer is not None:
            self._trainer.remove(slot.member)
        slot.lock.close()
        with self._cv:
            del self._slots[key]
            slot.error = slot.error or RuntimeError(f"{key}: left its pack worker")
            self._changed = time.monotonic()
            self._cv.notify_all()

    def _epoch(self, ready: Sequence[_Slot]) -> None:
        """One epoch of the ready members; each one's row journaled, its checkpoint written,
        then handed to its client."""
        try:
            metrics = self._trainer.train_epoch([s.member for s in ready])
        except Exception as err:  # the pack's computation: every member's trial fails, and is
            # retried from its checkpoint in a new pack
            self._trainer = None
            with self._cv:
                slots = list(self._slots.values())
            for slot in slots:
                slot.member = None
                self._deliver(slot, error=err)
            return
        for slot in ready:
            try:
                state = self._trainer.state(slot.member)
                row = {
                    **metrics[slot.member],
                    "label_hash": state["label_hash"],
                    "node_id": self._node,
                    "pid": self._pid,
                }
                slot.journal.append(
                    row
                )  # the row first: a journal never lacks a checkpointed epoch
                slot.checkpoints.save(state)
            except Exception as err:  # e.g. no space left: this trial fails, Tune retries it
                self._deliver(slot, error=err)
                continue
            self._deliver(slot, row=row, ended=ended(row, slot.epochs))

    def _deliver(
        self,
        slot: _Slot,
        row: dict[str, Any] | None = None,
        error: BaseException | None = None,
        ended: bool = True,
    ) -> None:
        with self._cv:
            if row is not None:
                slot.rows.append(row)
            slot.error = error
            slot.wants, slot.ended = False, ended
            self._cv.notify_all()


def _key(params: dict[str, Any]) -> str:
    return f"{params[SETTING]}/{params[TRIAL]}"


def start_workers(
    spec: SearchSpec,
    plans: Sequence[SettingPlan],
    experiment_dir: str,
    count: int,
    trainer: Callable[[Any], Any] | None = None,
) -> list[Any]:
    """`count` pack workers of `spec.pack` slots, each holding `spec.resources` (and building
    its pack with `trainer`, see PackWorker); restarted by Ray when they die (their trials are
    retried by Tune)."""
    r = spec.resources
    actor = ray.remote(
        num_cpus=r.cpus_per_trial,
        num_gpus=r.gpus_per_trial,
        max_restarts=-1,
        max_concurrency=2 * spec.pack + 4,  # every client's attach/next/detach at once
    )(PackWorker)
    by_name = {p.name: p for p in plans}
    return [actor.remote(spec.pack, by_name, experiment_dir, trainer) for _ in range(count)]


def member_trainable(params: dict[str, Any], workers: list[Any], epochs: int) -> None:
    """A Tune trial run in a pack worker's slot: attach, then report each epoch's row as the
    worker trains it, until the trial ends or Tune stops it (`tune.report` then exits the
    thread; the slot is freed on the way out)."""
    key, client = _key(params), uuid.uuid4().hex
    worker = _attach(workers, params, client)
    try:
        while True:
            row = ray.get(worker.next.remote(key, client))
            tune.report(row)
            if ended(row, epochs):
                return
    finally:
        worker.detach.remote(key, client)


def _attach(workers: list[Any], params: dict[str, Any], client: str) -> Any:
    """A worker with a free slot for the trial, trying them from one picked by its name (so
    trials spread over the workers) until one has a slot."""
    first = zlib.crc32(_key(params).encode()) % len(workers)
    order = workers[first:] + workers[:first]
    while True:
        for worker in order:
            if ray.get(worker.attach.remote(params, client)):
                return worker
        time.sleep(ATTACH_RETRY_S)
