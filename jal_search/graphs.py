"""A training step captured once as a CUDA graph and replayed per batch; eager where it cannot be.

On a GPU a small model's step is bound by kernel launches and per-step Python, not arithmetic:
one H200 ran cnn_small's whole step (forward, loss, backward, clipping, SGD) in 2.6 ms eagerly
and 0.51 ms as a replayed CUDA graph (`../shared/GPU.md`). `torch.compile(mode="reduce-overhead")`
over a step that also runs the optimiser failed there; manual capture worked, as done here.

A step given to `GraphedStep` must
- read its batch only from its arguments (a replay reads them from static buffers that each
  batch is copied into), and touch otherwise only tensors that outlive it, updated in place
  (parameters, gradients, optimiser state, a device lr, epoch sums): a replay runs the captured
  kernels on the same memory, and none of the step's Python runs again;
- make no host syncs (`.item()`, data-dependent shapes): capture forbids them, so such a step
  raises there, and then runs eagerly for good, after one warning. Capture runs no kernel, so a
  failed capture changed nothing: the batch is then stepped eagerly, as it would have been.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

Step = Callable[..., None]


class GraphedStep:
    """`step(*batch)` for each batch: replayed from one CUDA graph where `capture`, else eager.

    The first `warmup` batches run eagerly on a side stream (cuDNN, cuBLAS and autograd set up
    their kernels and streams outside capture, as torch requires); the next batch of the first
    batch's shapes is captured and replayed, and so is every later batch of those shapes. A batch
    of other shapes (an epoch's last, partial one) runs eagerly: the same step on the same tensors.
    Warm-up, capture and replay run the same kernels as an eager step, so results are the eager
    step's, bit for bit on one machine but for non-deterministic kernels (tests/test_graphs.py:
    a resumed graphed trial, whose first steps are eager again, ends as the uninterrupted one).
    """

    def __init__(self, step: Step, capture: bool, warmup: int = 3) -> None:
        self.step = step
        self.capture = capture
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[torch.Tensor, ...] = ()  # the graph's static batch
        self._shapes: list[torch.Size] | None = None  # a full batch's shapes: the first batch's
        self._eager_steps = 0

    def __call__(self, *batch: torch.Tensor) -> None:
        if not self.capture:  # off CUDA, or after a failed capture
            self.step(*batch)
            return
        shapes = [x.shape for x in batch]
        if self._shapes is None:
            self._shapes = shapes
        if shapes != self._shapes:  # an epoch's last, partial batch
            self.step(*batch)
        elif self.graph is not None:
            for static, x in zip(self.inputs, batch, strict=True):
                static.copy_(x)
            self.graph.replay()
        elif self._eager_steps < self.warmup:
            self._warm_up(batch)
            self._eager_steps += 1
        else:
            try:
                self.graph, self.inputs = self._record(batch)
            except Exception as err:  # whatever capture refuses: the step runs eagerly
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                warnings.warn(
                    f"CUDA graph capture failed, steps run eagerly ({reason})", stacklevel=2
                )
                self.capture = False
                self.step(*batch)
                return
            self.graph.replay()

    def _warm_up(self, batch: tuple[torch.Tensor, ...]) -> None:
        with torch.cuda.device(batch[0].device):  # streams are made on the current device
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step(*batch)
            torch.cuda.current_stream().wait_stream(side)

    def _record(
        self, batch: tuple[torch.Tensor, ...]
    ) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]:
        """Capture the step over static copies of `batch` (nothing runs until a replay)."""
        inputs = tuple(x.clone() for x in batch)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(batch[0].device), torch.cuda.graph(graph):
            self.step(*inputs)
        return graph, inputs
