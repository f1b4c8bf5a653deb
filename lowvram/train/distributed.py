"""Multi-GPU LoRA training with PyTorch's FSDP2 under torchrun: launch, shard the frozen base, split each batch.

Every rank sees the same global batch order and draws the same noise; each keeps its rows, and the loss is weighted
so that FSDP2's averaged LoRA gradient equals the single-process one. State leaves as whole tensors (rank 0 writes),
so a run resumes with any number of processes. It does not choose memory settings (plan/) nor write files itself
(checkpoint.py and lora.py do), and it refuses the quantized bases and offload strategies FSDP2 cannot shard.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from lowvram.errors import LowvramError, UsageError
from lowvram.multi_gpu import check_distributed_supported
from lowvram.train.batches import DiskBatches, LatentBatch  # light: loop.py imports torch and nothing heavy at the top

LAUNCH_FILE = "launch.json"
RANKS_DIR = "ranks"


# --------------------------------------------------------------------------------------------------------------------
# Where this process stands


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun job (read from the variables torchrun sets)."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> DistEnv | None:
    """The torchrun job this process belongs to, or None for a single-process run (WORLD_SIZE unset or 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return None
    return DistEnv(
        rank=int(os.environ["RANK"]), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    )


def is_main() -> bool:
    env = current()
    return env is None or env.is_main


def rank_dir(run_dir: str | Path) -> Path:
    """Where this rank writes its own logs (metrics, memory): the run folder on rank 0, `ranks/rank-N` elsewhere."""
    env = current()
    if env is None or env.is_main:
        return Path(run_dir)
    path = Path(run_dir) / RANKS_DIR / f"rank-{env.rank}"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Launching torchrun for the user


def launch(cfg, *, profile=None, nproc: int, force: bool = False, auto_recover: bool = True) -> int:
    """`lowvram train --nproc N`: run the same training under torchrun with N processes; returns its exit code.

    The exact config and profile go to the workers as one JSON file in the run folder, so nothing is re-parsed.
    """
    from lowvram.device import accelerator_available, accelerator_count
    from lowvram.fsutil import atomic_write_json

    check_distributed_supported(cfg, nproc)
    if cfg.model.family != "tiny" and accelerator_available() and nproc > accelerator_count():
        raise UsageError(f"--nproc {nproc} but this machine has {accelerator_count()} GPUs: use at most that many")
    run_dir = Path(cfg.output.output_dir).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = run_dir / LAUNCH_FILE
    atomic_write_json(
        spec,
        {
            "config": cfg.model_dump(mode="json"),
            "profile": None if profile is None else profile.model_dump(mode="json"),
            "force": force,
            "auto_recover": auto_recover,
        },
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "lowvram.train.worker",
        str(spec),
    ]
    return subprocess.run(cmd, check=False).returncode




# --------------------------------------------------------------------------------------------------------------------
# Process group, device, sharding


def start(backend_name: str = "auto"):
    """Join the torchrun job (gloo on CPU, nccl on GPUs) and return this rank's device backend.

    One GPU per process: rank r of a node uses GPU `LOCAL_RANK`.
    """
    import torch.distributed as dist

    from lowvram.device import accelerator_available, get_backend

    env = current()
    if env is None:
        raise LowvramError("not started by torchrun: use `lowvram train --nproc N` (or torchrun -m lowvram train ...)")
    use_gpu = backend_name != "cpu" and accelerator_available()
    backend = get_backend("cuda", index=env.local_rank) if use_gpu else get_backend("cpu")
    if use_gpu:
        # NCCL binds to the current device; torch.accelerator is the device-agnostic API (no torch.cuda here).
        torch.accelerator.set_device_index(env.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_gpu else "gloo", device_id=backend.device if use_gpu else None)
    return backend


def stop() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body first (writes caches, demo clips), the others after it (they then find them ready)."""
    main = is_main()
    if not main:
        barrier()
    try:
        yield
    finally:
        if main:
            barrier()


@contextlib.contextmanager
def in_turn() -> Iterator[None]:
    """Ranks run the body one after another, rank 0 first (every rank passes `world_size` barriers in all).

    Loading the transformer this way and sharding it inside the body keeps one whole copy in host RAM at a time
    instead of one per process.
    """
    env = current()
    if env is None:
        yield
        return
    for _ in range(env.rank):
        barrier()
    try:
        yield
    finally:
        for _ in range(env.rank, env.world_size):
            barrier()


def shard_transformer(transformer: torch.nn.Module, backend) -> None:
    """FSDP2: each transformer block is one shard unit (gathered for its forward and again for its backward), the
    root holds the rest. LoRA parameters are sharded with their block, so their gradients are reduce-scattered
    (averaged over ranks) and the optimizer state is split too. A module already sharded is left as it is.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(transformer, FSDPModule):
        return
    # FSDP2 needs one dtype for all trainable parameters of a unit: the LoRA trains in fp32 master copies (as the
    # single-process loop does for adamw, the only optimizer allowed here) over a bf16 or fp32 base.
    for p in transformer.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    mesh = init_device_mesh(backend.device.type, (current().world_size,))
    for block in transformer.transformer_blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(transformer, mesh=mesh)
    # The transformer returns a tuple whose items are views; the loss reads them out of place, so FSDP2's warning
    # about in-place ops on views does not apply.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


# --------------------------------------------------------------------------------------------------------------------
# Each rank's rows of a global batch


def rank_rows(batch_size: int, rank: int, world_size: int) -> tuple[list[int], bool]:
    """This rank's contiguous rows of a batch, and whether they are real.

    A small final batch can leave a rank without rows; it then borrows row 0 with weight 0, because every rank
    must run the forward and backward for FSDP2's collectives.
    """
    base, extra = divmod(batch_size, world_size)
    start = rank * base + min(rank, extra)
    rows = list(range(start, start + base + (1 if rank < extra else 0)))
    return (rows, True) if rows else ([0], False)


@dataclass(frozen=True)
class LocalRows:
    inputs: Any  # FlowInputs of this rank's rows
    text: Any  # TextEmbeddings of this rank's rows
    real: bool


class DataParallel:
    """Splits a step's noised global batch into this rank's rows and weights the loss to make gradients global.

    FSDP2 averages gradients over ranks; the loss is the mean over the global batch of each sample's own masked MSE
    (the official reduction, `objective.flow_loss`), so rank r's loss is its rows' summed per-sample losses scaled by
    `world / rows_total` (one all-reduce of three numbers per micro-batch). The loss values reported are the global
    ones.
    """

    def __init__(self, env: DistEnv):
        self.env = env

    def take_rows(self, inputs, text) -> LocalRows:
        batch = inputs.video_noisy.shape[0]
        rows, real = rank_rows(batch, self.env.rank, self.env.world_size)
        index = torch.tensor(rows, device=inputs.video_noisy.device)
        return LocalRows(inputs=_select_rows(inputs, index, batch), text=_select_rows(text, index, batch), real=real)

    def loss(self, video_pred: torch.Tensor, audio_pred: torch.Tensor, local: LocalRows, objective):
        """flow_loss for this rank's rows, weighted so that the ranks' averaged gradient is the global batch's."""
        import torch.distributed as dist

        return rank_share(video_pred, audio_pred, local, objective, self.env.world_size, dist.all_reduce)


def rank_share(video_pred, audio_pred, local: LocalRows, objective, world_size: int, all_reduce):
    """This rank's weighted share of the global per-sample loss; `all_reduce` sums a tensor over the ranks in place.

    Summed over ranks and divided by `world_size` (what FSDP2 does to gradients), the shares' gradients are those of
    `flow_loss` on the whole batch: mean over all rows of (video_b + audio_loss_weight · audio_b).
    """
    from lowvram.method.objective import LossParts, masked_mse_per_sample

    inputs = local.inputs
    video = masked_mse_per_sample(video_pred, inputs.video_target, inputs.video_loss_mask)  # [rows]
    audio = masked_mse_per_sample(audio_pred, inputs.audio_target, inputs.audio_loss_mask)
    keep = 1.0 if local.real else 0.0  # a borrowed row counts for nothing
    video_sum, audio_sum = video.sum() * keep, audio.sum() * keep
    rows = torch.tensor(float(video.shape[0]) * keep, device=video.device)
    stats = torch.stack([rows, video_sum.detach(), audio_sum.detach()])
    all_reduce(stats)  # [rows, summed video, summed audio] over all ranks
    total_rows = stats[0].clamp_min(1.0)
    share = world_size * (video_sum + objective.audio_loss_weight * audio_sum) / total_rows
    video_all, audio_all = stats[1] / total_rows, stats[2] / total_rows
    global_total = video_all + objective.audio_loss_weight * audio_all
    # The total's value is the global loss (what logs show); its gradient is this rank's weighted share.
    total = share + (global_total - share).detach()
    return LossParts(total=total, video=video_all, audio=audio_all)


def _select_rows(value, index: torch.Tensor, batch: int):
    """A frozen dataclass with every batch-first tensor field reduced to `index` rows."""
    updates = {}
    for f in fields(value):
        t = getattr(value, f.name)
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch:
            updates[f.name] = t.index_select(0, index.to(t.device))
    return replace(value, **updates)


# --------------------------------------------------------------------------------------------------------------------
# Reading only this rank's rows from the latent cache


def rank_batches(batches, env: DistEnv | None = None):
    """The batch stream this rank trains on: for the disk cache, one that reads only this rank's rows."""
    env = env or current()
    if env is None or not isinstance(batches, DiskBatches):
        return batches  # in-memory batches hold every row already
    return RankDiskBatches(batches.items, batches.batch_size, seed=batches.seed, fps=batches.fps, env=env)


class RankDiskBatches(DiskBatches):
    """DiskBatches with the same global order and positions, loading only this rank's rows from disk.

    Other ranks' rows are zeros of the same shape: noise is drawn for the whole global batch on every rank (so each
    row gets the noise it gets in a single-process run), and only this rank's rows reach the model.
    """

    def __init__(self, items: list, batch_size: int, *, seed: int, fps: float, env: DistEnv):
        self.env = env
        self._text_memo: dict = {}
        self._plans: dict[int, list[list[int]]] = {}
        super().__init__(items, batch_size, seed=seed, fps=fps)

    def seek(self, position: dict[str, Any]) -> None:
        self._next = int(position["position"])

    def __next__(self) -> LatentBatch:
        from lowvram.data.batches import epoch_plan, load_batch
        from lowvram.models.ltx2.forward import pack_audio_latents, pack_video_latents

        epoch, offset = divmod(self._next, self._per_epoch)
        if epoch not in self._plans:
            self._plans = {epoch: epoch_plan(self.items, self.batch_size, self.seed, epoch)}
        members = self._plans[epoch][offset]
        rows, _ = rank_rows(len(members), self.env.rank, self.env.world_size)
        b = load_batch([self.items[members[i]] for i in rows], self._next, epoch, self._text_memo)
        self._next += 1
        n = len(members)
        video = None if b.video_latents is None else _spread(pack_video_latents(b.video_latents), rows, n)
        f, h, w = (1, 1, 1) if b.video_latents is None else tuple(b.video_latents.shape[2:])
        return LatentBatch(
            video=video,
            audio=_spread(pack_audio_latents(b.audio_latents), rows, n),
            text_video=_spread(b.text_video, rows, n),
            text_audio=_spread(b.text_audio, rows, n),
            text_mask=_spread(b.text_mask, rows, n),
            latent_frames=f,
            latent_height=h,
            latent_width=w,
            fps=self.fps,
            audio_present=_spread(b.audio_mask, rows, n) > 0,
        )


def _spread(t: torch.Tensor, rows: list[int], batch: int) -> torch.Tensor:
    out = t.new_zeros((batch, *t.shape[1:]))
    out[rows] = t
    return out


# --------------------------------------------------------------------------------------------------------------------
# Whole-tensor state: checkpoints and the exported LoRA are independent of the number of processes


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if _is_dtensor(t) else t


def _like(full: torch.Tensor, shard_of: torch.Tensor) -> torch.Tensor:
    """`full` cut like the sharded `shard_of` (each rank keeps its own chunk; no communication)."""
    from torch.distributed.tensor import distribute_tensor

    if not _is_dtensor(shard_of):
        return full.to(shard_of.device)
    local = full.to(shard_of.to_local().device, shard_of.dtype)
    return distribute_tensor(local, shard_of.device_mesh, shard_of.placements, src_data_rank=None)


@contextlib.contextmanager
def whole_lora(model: torch.nn.Module, *, write_back: bool = False) -> Iterator[bool]:
    """Inside, the trainable parameters are whole tensors on every rank (an all-gather, LoRA only: small).

    Yields whether this rank is the one that writes files. With `write_back`, values copied into the whole tensors
    are cut back into the shards on exit (loading a checkpoint). Single-process: yields True and changes nothing.
    """
    if current() is None:
        yield True
        return
    swapped = []
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.requires_grad and _is_dtensor(p):
                    whole = torch.nn.Parameter(p.full_tensor().clone(), requires_grad=True)
                    module._parameters[name] = whole
                    swapped.append((module, name, p, whole))
    try:
        yield is_main()
    finally:
        with torch.no_grad():
            for module, name, sharded, whole in swapped:
                module._parameters[name] = sharded
                if write_back:
                    sharded.copy_(_like(whole.detach(), sharded))


class _WholeOptimizerState:
    """What checkpoint.save_checkpoint reads from an optimizer, with sharded state gathered into whole tensors."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        sd = optimizer.state_dict()
        self._sd = {
            "state": {i: {k: _full(v) for k, v in s.items()} for i, s in sd["state"].items()},
            "param_groups": sd["param_groups"],
        }

    def state_dict(self) -> dict:
        return self._sd


class _OptimizerLoader:
    """What checkpoint.load_checkpoint hands an optimizer; whole state tensors are cut into the live shards."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups

    def load_state_dict(self, sd: dict) -> None:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        state = {}
        for idx, s in sd["state"].items():
            p = params[int(idx)]
            state[idx] = {
                k: _like(v, p) if isinstance(v, torch.Tensor) and v.shape == p.shape else v for k, v in s.items()
            }
        self.optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def save_checkpoint(run_dir, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, **kwargs) -> Path | None:
    """checkpoint.save_checkpoint for a sharded run: every rank gathers, rank 0 writes, all wait for the write."""
    from lowvram.train import checkpoint

    whole_optimizer = _WholeOptimizerState(optimizer)
    path = None
    with whole_lora(model) as writer:
        if writer:
            path = checkpoint.save_checkpoint(run_dir, model=model, optimizer=whole_optimizer, **kwargs)
    barrier()
    return path


def load_checkpoint(path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, **kwargs):
    """checkpoint.load_checkpoint for a sharded run: every rank reads the whole state and keeps its shards."""
    from lowvram.train import checkpoint

    with whole_lora(model, write_back=True):
        return checkpoint.load_checkpoint(path, model=model, optimizer=_OptimizerLoader(optimizer), **kwargs)

