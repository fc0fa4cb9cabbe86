"""Training on several processes with PyTorch's own engine: torchrun's environment in, a process group, a
wrapped model, sharded batches and rank-0 checkpoints out.

`torchrun --nproc_per_node N -m lmforge train ...` starts N copies of the ordinary trainer; each finds its
place in the environment torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT) and `setup` joins
them into one process group (gloo on CPU, NCCL on CUDA). Without torchrun (WORLD_SIZE unset or 1) nothing
here starts a group and the trainer runs exactly as a single process.

- The data: every optimizer step draws the GLOBAL batch a single process with batch_size * world would draw
  (the same seeded generator on every rank), and each rank reads only its own rows of it from the memmap. The
  gradients DDP averages are then the single-process gradients, so the runs agree to float rounding.
- The model: DistributedDataParallel (each rank a full replica), or FSDP2 `fully_shard` (each Transformer
  block, then the root, sharded across ranks) for models that do not fit one device.
- Checkpoints: rank 0 writes the model folder. Under FSDP the weights are gathered first ("consolidated": a
  normal model folder that `load_model` reads), or every rank writes its shard with torch.distributed.checkpoint
  into `sharded/` inside the folder ("sharded": nothing is gathered; `consolidate` turns it into a normal one).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

DEVICES = ("auto", "cpu", "cuda", "mps")
SHARDED_DIR = "sharded"  # torch.distributed.checkpoint files inside a sharded FSDP model folder


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: global rank, world size, rank on its node, and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this `setup` started the process group, so `teardown` ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------------------------------------- process group


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto`: this rank's CUDA device when there is one, else the CPU (MPS only when asked for by name)."""
    if name not in DEVICES:
        raise ValueError(f"device={name!r} is not one of: {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but this PyTorch sees no CUDA GPU; use --device cpu (or auto)")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("device='mps' but MPS is not available here; use --device cpu (or auto)")
        return torch.device("mps")
    return torch.device("cpu")


def setup(device: str = "cpu") -> Dist:
    """Join the process group torchrun describes in the environment (if any) and pick this rank's device.
    RANK and WORLD_SIZE reach init_process_group through the environment, as do MASTER_ADDR and MASTER_PORT."""
    world, local_rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world <= 1:
        return Dist(device=dev)
    if dev.type == "mps":
        raise ValueError(
            "multi-process training on MPS is not supported by PyTorch's process groups; "
            "use --device cpu (gloo) or cuda (NCCL)"
        )
    owns = not dist.is_initialized()
    if owns:
        if dev.type == "cuda":  # NCCL, bound to this rank's GPU (barriers then need no guess)
            torch.cuda.set_device(dev)
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=dev, owns_group=owns)


def teardown(env: Dist) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: Dist) -> None:
    """Wait for every rank (rank 0 finishing a file before the others go on, say)."""
    if env.world > 1:
        dist.barrier()


def all_reduce(tensor: torch.Tensor, env: Dist, op=None) -> torch.Tensor:
    """Sum (or `op`) of `tensor` over the ranks, in place; the tensor itself in a single process."""
    if env.world > 1:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def max_over_ranks(values: list[float], env: Dist) -> list[float]:
    """The element-wise largest of the ranks' values, on every rank: the elapsed time that a time budget's stop
    and a time-driven learning rate follow, and a stop request, so that all ranks decide alike."""
    if env.world == 1:
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=env.device)
    return all_reduce(t, env, dist.ReduceOp.MAX).tolist()


def gather_objects(obj, env: Dist) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if env.world == 1:
        return [obj]
    out = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------- batches


def random_batch_shard(
    data: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator, env: Dist
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of `data.random_batch(data, batch_size * world, ...)`: the same draw from `generator`
    on every rank (so the generators stay in step), then only rows rank*B..(rank+1)*B are read."""
    ix = torch.randint(len(data) - block_size, (batch_size * env.world,), generator=generator)
    ix = ix[env.rank * batch_size : (env.rank + 1) * batch_size]
    rows = torch.from_numpy(np.asarray(data[ix.numpy()[:, None] + np.arange(block_size + 1)], dtype=np.int64))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # (B, T), (B, T)


def stream_shard(data: np.ndarray, batch_size: int, env: Dist) -> np.ndarray:
    """The part of `data` holding this rank's `batch_size` of the batch_size * world streams that
    `data.sequential_batches` cuts: `sequential_batches(stream_shard(...), batch_size, T)` yields this rank's
    rows of the global windows."""
    n = len(data) // (batch_size * env.world)  # tokens per stream
    return data[env.rank * batch_size * n : (env.rank + 1) * batch_size * n]


def shard_rows(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None, rows: int, env: Dist):
    """This rank's `rows` rows of a global (x, y, mask) batch. A rank left with none (the short last batch of a
    full evaluation) gets one row with nothing scored, so every rank still runs the forward pass FSDP needs."""
    if env.world == 1:
        return x, y, mask
    lo, hi = env.rank * rows, (env.rank + 1) * rows
    if lo >= len(x):
        return x[:1], y[:1], torch.zeros_like(y[:1], dtype=torch.bool)
    return x[lo:hi], y[lo:hi], None if mask is None else mask[lo:hi]


# ---------------------------------------------------------------------------------------------- the model


def wrap(model: nn.Module, env: Dist, fsdp: bool) -> nn.Module:
    """DDP (a full replica per rank) or FSDP2 (each block and the root sharded) around `model`, already on
    `env.device`; the model itself in a single process."""
    if env.world == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)  # the root: embeddings, final norm and the (tied) head
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # the only buffers (rope tables) are constants: synced once at init, not before every forward
    no_buffer_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DDP).parameters
        else {"broadcast_buffers": False}
    )  # the older name, deprecated since
    return DDP(
        model,
        device_ids=[env.device.index] if env.device.type == "cuda" else None,
        gradient_as_bucket_view=True,
        **no_buffer_sync,
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The Transformer inside a DDP wrapper (FSDP2 keeps the module itself, its parameters sharded)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")  # never imported: nothing can be sharded (and no import cost)
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def grad_sync(model: nn.Module, sync: bool):
    """A context for one micro-batch's backward: gradients are all-reduced only when `sync` (the last
    micro-batch of a step); the others accumulate locally (DDP no_sync, FSDP2 set_requires_gradient_sync)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        return model.no_sync()
    if is_fsdp(model):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- FSDP checkpoints


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The whole model and optimizer state gathered onto rank 0's CPU (empty dicts on other ranks); a
    collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an optimizer state saved by `full_state` into a sharded model's optimizer (every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, env: Dist) -> Path:
    """Every rank writes its shards into a scratch folder beside `folder` (torch.distributed.checkpoint);
    returns it for rank 0 to move into the model folder it writes atomically."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    scratch = folder.with_name(f".{folder.name}.{SHARDED_DIR}-tmp")
    if env.is_main:
        shutil.rmtree(scratch, ignore_errors=True)
    barrier(env)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(scratch))
    barrier(env)
    return scratch


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load the shards `save_sharded` wrote (moved into `folder`/sharded) into a model sharded the same way."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(folder / SHARDED_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def consolidate(folder: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Turn a sharded FSDP model folder into a normal one (model.safetensors) at `out`, in one process."""
    import torch.distributed.checkpoint as dcp

    from lmforge.checkpoint import CONFIG_FILE, save_model
    from lmforge.config import ModelConfig
    from lmforge.model import Transformer
    from lmforge.tokenizer import TOKENIZER_FILES, load_tokenizer

    folder = Path(folder)
    if not (folder / SHARDED_DIR).is_dir():
        raise FileNotFoundError(f"{folder / SHARDED_DIR} not found: {folder} is not a sharded FSDP checkpoint")
    model = Transformer(ModelConfig.from_file(folder / CONFIG_FILE))
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one process is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(folder / SHARDED_DIR), no_dist=True)
    model.load_state_dict(state["model"])
    tokenizer = load_tokenizer(folder) if any((folder / n).is_file() for n in TOKENIZER_FILES) else None
    return save_model(out, model, tokenizer)


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenizer,
    train_state: dict,
    env: Dist,
    sharded: bool = False,
) -> None:
    """Write a resumable model folder: rank 0 writes it, from the replica (plain, DDP), the gathered weights
    (FSDP consolidated: `load_model` reads it) or every rank's shards (FSDP sharded). Every rank calls this."""
    from lmforge.checkpoint import CONFIG_FILE, TRAIN_STATE_FILE, save_model, write_folder

    if not is_fsdp(model):
        if env.is_main:
            save_model(folder, unwrap(model), tokenizer, {**train_state, "optimizer": optimizer.state_dict()})
        return
    if sharded:
        scratch = save_sharded(folder, model, optimizer, env)
        if env.is_main:

            def write(tmp: Path) -> None:
                (tmp / CONFIG_FILE).write_text(model.config.to_json(), encoding="utf-8")
                if tokenizer is not None:
                    tokenizer.save(tmp)
                torch.save({**train_state, "optimizer_format": "sharded"}, tmp / TRAIN_STATE_FILE)
                shutil.move(scratch, tmp / SHARDED_DIR)

            write_folder(folder, write)
        barrier(env)  # the scratch folder is free again before anyone saves the next checkpoint
        return
    from lmforge.model import Transformer

    model_sd, optim_sd = full_state(model, optimizer)
    if env.is_main:
        full = Transformer(model.config)
        full.load_state_dict(model_sd)
        save_model(folder, full, tokenizer, {**train_state, "optimizer": optim_sd, "optimizer_format": "fsdp-full"})


def restore_optimizer(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load the optimizer state (and, for a sharded checkpoint, the weights) a checkpoint of `folder` holds,
    in the form the run that wrote it used; a checkpoint from the other kind of run is refused by name."""
    saved = state.get("optimizer_format", "torch")  # torch: optimizer.state_dict() of a replica
    running = ("sharded", "fsdp-full") if is_fsdp(model) else ("torch",)
    if saved not in running:
        kinds = {
            "torch": "a single-process or DDP run",
            "fsdp-full": "an FSDP run (consolidated)",
            "sharded": "an FSDP run (sharded)",
        }
        raise ValueError(
            f"{folder} was saved by {kinds[saved]}; resume it the same way (with{'out' if saved == 'torch' else ''} "
            f"--fsdp), or start a new run from its weights"
        )
    if saved == "sharded":
        load_sharded(folder, model, optimizer)
    elif saved == "fsdp-full":
        load_full_optimizer_state(model, optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
