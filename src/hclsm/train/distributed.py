"""Multi-process training with PyTorch's own engine: ``torchrun`` + ``torch.distributed`` + DDP.

The training loop calls ``setup()``; it reads the environment ``torchrun`` sets (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and, with more than one process, joins the
process group (``nccl`` on CUDA, ``gloo`` on CPU). A single process (plain ``python`` / ``hclsm``)
gets a ``Dist`` with ``world == 1`` and every helper here is a no-op, so the loop has one code path.

What the loop does with it: each rank draws the same *global* batch indices from the same sampler
stream and keeps its own contiguous share (so N ranks see exactly the batch one process would), the
model is wrapped in ``DistributedDataParallel`` (gradients averaged) or, with ``train.parallel=fsdp``,
sharded in place by FSDP2's ``fully_shard`` (parameters, gradients and optimizer state split across
ranks; checkpoints gather them into the single-process layout, so a run can be resumed or evaluated
with any number of processes), the losses are averaged across ranks before the finiteness check (so
every rank skips or applies the same step), the EMA target is updated on every rank from identical
weights, and only rank 0 writes files or prints.

    torchrun --nproc_per_node 2 -m hclsm train --data data/physics --steps 2000      # one machine
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 --rdzv_backend c10d \\
             --rdzv_endpoint HOST:29500 -m hclsm train --data data/physics             # two machines
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from hclsm.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (``world == 1``: not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # processes on this machine (they share its CPU cores)

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files, logs and progress bars."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def share(self, global_batch: int) -> slice:
        """This rank's contiguous slice of a global batch of ``global_batch`` samples."""
        per = global_batch // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean of ``values`` over ranks (every rank gets it); ``values`` itself when not distributed."""
        if not self.active:
            return values
        out = values.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.world

    def from_main(self, value: float) -> float:
        """Rank 0's ``value`` on every rank (decisions that must agree, e.g. a wall-clock budget)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._device())
        dist.broadcast(t, src=0)
        return float(t.item())

    def _device(self) -> torch.device:
        on_gpu = dist.get_backend() == "nccl"
        return torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, e.g. under taskset
    or a container's cpuset), not the machine's total."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def default_threads(local_world: int = 1) -> int:
    """Intra-op threads for a process when ``train.threads`` is 0: ``OMP_NUM_THREADS`` when the user set it; else
    this process's share of its CPUs, less the cores other processes keep busy (the 1-minute load average), and at
    least 1. More busy torch threads than cores make PyTorch's OpenMP threads wait on each other: a step then runs
    30-70x slower (measured on 2 cores with 6 processes), where one thread per process only shares the cores."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    share = max(1, available_cpus() // max(1, local_world))
    if not hasattr(os, "getloadavg"):
        return share
    free = available_cpus() - int(os.getloadavg()[0] + 0.5)
    return max(1, min(share, free))


def env_world() -> Dist:
    """The ``Dist`` the environment describes (without joining anything)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError:
        raise ConfigError("WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers; launch with "
                          "torchrun") from None
    return Dist(rank=rank, world=world, local_rank=local, local_world=local_world)


def setup(device: torch.device, global_batch: int, accumulate: int = 1) -> tuple[Dist, torch.device]:
    """Join the process group ``torchrun`` describes (when there is one) and return this rank's
    ``Dist`` and device (``cuda:LOCAL_RANK`` on GPUs). The global batch must split evenly over the
    processes and, within each, over ``accumulate`` micro-batches."""
    d = env_world()
    if not d.active:
        return d, device
    if global_batch % (d.world * accumulate):
        pieces = f"{d.world} processes" + (f" x {accumulate} micro-batches" if accumulate > 1 else "")
        raise ConfigError(f"train.batch_size: the global batch ({global_batch}) must split evenly over "
                          f"{pieces}; use a multiple of {d.world * accumulate}")
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d, device


def wrap(model: nn.Module, d: Dist, device: torch.device, parallel: str = "ddp") -> nn.Module:
    """``model`` ready for data-parallel training when distributed; build the optimizer after this.

    ``ddp``: ``DistributedDataParallel`` (rank 0's weights are broadcast to all);
    ``find_unused_parameters`` because which parameters a step uses changes over training (e.g. the
    existence head only once gating starts), and DDP must not wait for gradients that never come.
    ``fsdp``: FSDP2 ``fully_shard`` on the whole model, in place: every parameter (and so its gradient
    and optimizer state) is split across the ranks and gathered for the step's forward and backward.
    """
    if not d.active:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP shards (DTensors)."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Inside: an FSDP model's parameters are whole on every rank (all-gathered), so any of its
    submodules can run; outside they are shards again. A no-op for other models."""
    if not sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def _fqn_ids(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order: position i is the parameter the optimizer calls i."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The whole (unsharded) model and optimizer state dicts on every rank, the optimizer's in its own
    numbered layout, as a single process would save them. A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=False)
    model_sd = {k: v.detach().cpu() for k, v in get_model_state_dict(model, options=opts).items()}
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    index = {name: i for i, name in enumerate(_fqn_ids(model, optimizer))}
    state = {index[name]: {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
             for name, st in osd["state"].items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]
    return model_sd, {"state": state, "param_groups": groups}


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """Load a numbered (single-process layout) optimizer state dict, into shards when ``model`` is FSDP."""
    if not sharded(model):
        optimizer.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _fqn_ids(model, optimizer)
    fqn = {"state": {names[int(i)]: st for i, st in sd["state"].items()},
           "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in sd["param_groups"]]}
    # not strict: a parameter that never received a gradient (HCLSM's dynamics in a stage-1 run) has no
    # optimizer state yet; the model's own keys were checked strictly before this
    set_optimizer_state_dict(model, optimizer, fqn, options=StateDictOptions(full_state_dict=True, strict=False))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for name, param in zip(names, params):  # and it keeps none, as in the uninterrupted run (no zero-filled state)
        if name not in fqn["state"]:
            optimizer.state.pop(param, None)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def teardown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()
