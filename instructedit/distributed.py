"""Beyond one device: data-parallel meta-training over processes, and a base model spread over GPUs.

Data parallelism (``accelerate launch``, ``torchrun``; a no-op in one process):
Every process holds the whole frozen base model and the whole editor and edits its own records.
What must agree across processes goes through here, so that P processes running ``g`` micro-batches
each compute what one process running ``g·P`` micro-batches computes (up to floating-point
reduction order):

- MEND gradients (network and step sizes α): averaged before clipping and the optimizer step, so
  every process takes the same step and the editors never drift apart.
- Normalization statistics: for every micro-batch round, every process gathers the (count, mean,
  M2) contributions of all processes and merges them in rank order. The process of rank p
  normalizes with the statistics through its own contribution — exactly what one process merging
  the same micro-batches one after the other would use — and all end the round identical.
- Per-step bookkeeping (losses, skip counts) and validation results: gathered, merged in rank order.

One process (rank 0) writes logs and checkpoints. The process group is set up by accelerate's
``PartialState`` from the launcher's environment (gloo on CPU, NCCL on GPUs).

A base model loaded with ``model.device_map`` is spread over a process's GPUs by accelerate's
hooks; ``device_map_placement`` says where the batches and the editor must then live.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from instructedit.editors.mend import MENDEditor, Moments, RunningNorm
from instructedit.models.loading import resolve_device

_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel run (rank 0 of 1 without a launcher)."""

    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # processes on this machine
    device: torch.device | None = None  # the process's device under a launcher; None: the config decides

    @classmethod
    def from_environment(cls, cpu: bool = False) -> "Distributed":
        """Join the process group a launcher described in the environment (WORLD_SIZE > 1), else one process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        from accelerate import PartialState

        use_cpu = cpu or not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in _TRUE
        state = PartialState(cpu=use_cpu)
        if state.num_processes != world:
            raise RuntimeError(
                f"WORLD_SIZE={world} but accelerate set up {state.num_processes} process(es) "
                f"({state.distributed_type}); launch with `accelerate launch --multi_gpu` or `torchrun`"
            )
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        return cls(rank=state.process_index, world_size=state.num_processes, local_world_size=local, device=state.device)

    def model_device(self, training_device: str, device_map: str | dict[str, Any] | None) -> torch.device:
        """Where this process loads its model: the launcher's device, else ``training.device``. A ``model.device_map``
        places the weights itself and needs the machine's GPUs to itself: one process per machine."""
        if device_map is not None and self.local_world_size > 1:
            raise ValueError(
                f"config field 'model.device_map': {device_map!r} spreads the model over this machine's GPUs, but "
                f"{self.local_world_size} processes run on it; launch one process per machine, or set model.device_map=null"
            )
        if self.enabled and device_map is None:
            return self.device
        return torch.device(resolve_device(training_device, "training.device"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The process that writes logs and checkpoints."""
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group, once every process is past its last collective (the end of a run). A process that exits
        with a gloo group still open can abort in the group's threads' teardown after a finished run ("terminate called
        without an active exception", SIGABRT: pytorch/pytorch#190489), and the launcher then reports the run as failed."""
        if self.enabled and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    # -- generic collectives -------------------------------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value`` (picklable, small), in rank order, on every process."""
        if not self.enabled:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Key-wise sums over processes, in rank order (``values`` itself in one process)."""
        if not self.enabled:
            return values
        total: dict[str, float] = {}
        for part in self.gather(values):
            for key, value in part.items():
                total[key] = total.get(key, 0) + value
        return total

    def mean(self, means: dict[str, float]) -> dict[str, float]:
        """Merge per-process means over ``means["n"]`` items each into the mean over all items."""
        if not self.enabled:
            return means
        parts = [m for m in self.gather(means) if m["n"] > 0]
        n = sum(m["n"] for m in parts)
        if n == 0:
            return {"n": 0}
        return {k: sum(m[k] * m["n"] for m in parts) / n for k in parts[0] if k != "n"} | {"n": n}

    def check_same(self, value: Any, what: str) -> None:
        """Raise on every process if the processes disagree about ``value``."""
        values = self.gather(value)
        if any(v != values[0] for v in values):
            raise RuntimeError(f"the processes disagree about {what}: {values} (by rank)")

    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers into every other process's ``module``."""
        if not self.enabled:
            return
        with torch.no_grad():
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    # -- MEND --------------------------------------------------------------------------------
    def average_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Replace every ``.grad`` by its mean over processes (a process without one contributes zeros).

        A parameter that no process has a gradient for keeps ``grad=None``, as a single process would
        (so Adam skips it in both cases).
        """
        if not self.enabled:
            return
        device = params[0].device
        present = torch.tensor([float(p.grad is not None) for p in params], device=device)
        dist.all_reduce(present)
        for param, count in zip(params, present.tolist()):
            if count == 0:
                continue
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad)
            param.grad.div_(self.world_size)

    def attach(self, editor: MENDEditor) -> None:
        """Make ``editor``'s statistic updates merge every process's contributions (no-op in one process)."""
        if self.enabled:
            for transform in editor.transforms.values():
                transform.exchange = self.exchange_statistics

    def exchange_statistics(self, local: tuple[Moments, Moments]) -> tuple[list[tuple[Moments, Moments]], int]:
        """All processes' (u, δ) moments of this round, in rank order, and this process's rank."""
        (n_u, mean_u, m2_u), (n_d, mean_d, m2_d) = local
        d_in, d_out = mean_u.numel(), mean_d.numel()
        # float64 carries the float32 moments and the counts exactly
        flat = torch.cat([mean_u.new_tensor([n_u]), mean_u, m2_u, mean_d.new_tensor([n_d]), mean_d, m2_d]).double()
        gathered = [torch.empty_like(flat) for _ in range(self.world_size)]
        dist.all_gather(gathered, flat)
        everyone = []
        for row in gathered:
            u, d = row[: 1 + 2 * d_in], row[1 + 2 * d_in :]
            everyone.append((
                (int(u[0]), u[1 : 1 + d_in].to(mean_u.dtype), u[1 + d_in :].to(mean_u.dtype)),
                (int(d[0]), d[1 : 1 + d_out].to(mean_d.dtype), d[1 + d_out :].to(mean_d.dtype)),
            ))
        return everyone, self.rank

    def skip_statistics(self, editor: MENDEditor, rounds: int = 1) -> None:
        """Take part in a micro-batch's statistics exchanges without a micro-batch of one's own.

        The other processes are inside ``editor.edit`` (``rounds`` times: once per record of a
        ``batch_size`` > 1 micro-batch); each call exchanges once per weight-shape group, in the
        editor's group order, so this process does the same.
        """
        if not self.enabled:
            return
        for transform in [t for _ in range(rounds) for t in editor.transforms.values()]:
            no_rows = (
                RunningNorm.moments(transform.norm_u.mean.new_zeros(0, transform.d_in)),
                RunningNorm.moments(transform.norm_delta.mean.new_zeros(0, transform.d_out)),
            )
            everyone, _ = self.exchange_statistics(no_rows)
            transform.merge_statistics(everyone)


def device_map_placement(model: torch.nn.Module, editor: MENDEditor) -> tuple[torch.device, torch.device]:
    """(batch device, editor device) of a model spread by ``device_map``: where the suffix ends and is edited.

    Losses are taken on the output embeddings' device, so the final norm must sit there too; the
    MEND network goes where the edited weights are.
    """
    head = model.get_output_embeddings().weight.device
    norm = next(model.get_submodule(editor.split(model).spec.final_norm).parameters()).device
    edited = {model.get_parameter(w.name).device for w in editor.weights}
    if norm != head or len(edited) != 1:
        raise ValueError(
            f"config field 'model.device_map': the final norm ({norm}) must share a device with the output embeddings "
            f"({head}), and the edited weights ({sorted(map(str, edited))}) one device; pass a mapping that keeps them together"
        )
    return head, edited.pop()
