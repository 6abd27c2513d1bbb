"""Latent sharding: one SA-GSAE's latents split over the ranks of a ``torchrun`` world.

The world is a 2-D ``DeviceMesh`` (data x latents), chosen by one option,
``TrainConfig.latent_shards``: rank = data_rank x latents + latent_rank, so the ranks that
share a batch are neighbours (one node's GPUs). A rank owns latents
[latent_rank F/L, (latent_rank + 1) F/L): its columns of W_enc, rows of W_dec and its per-latent
parameters (gate bias, thresholds, magnitudes); b_dec is replicated. Every SA-GSAE latent is its
own, so a rank computes its latents with no communication; the partial reconstruction
f W_dec (and the aux term's u W_dec, and the per-row sparsity sums) is completed by one
all-reduce of a batch x d tensor over the rank's latent group. Data parallelism runs across
the data dimension as before (``sign_sae.distributed``), over the data group.

The gradient rule is tensor parallelism's, built from DTensor's own placements
(``Partial`` -> ``Replicate``): the completed reconstruction's gradient reaches each shard
unchanged, and the centred input x - b_dec, which every shard reads, sums its gradient over the
shards. So every rank holds the true gradient of its own latents' parameters and the whole
gradient of b_dec, the same on every latent rank; the global gradient norm (clipping) adds the
shards' squared norms. Checkpoints and saved SAEs are gathered: the 1-process format, so a
checkpoint resumes on any number of ranks. docs/distributed.md ("Latent sharding").
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from sae_lens import TrainingSAE
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate

from sign_sae import distributed
from sign_sae.errors import SignSAEError
from sign_sae.sa_gsae import SAGSAETrainingSAE

DIMS = ("data", "latents")


@dataclass(frozen=True)
class Mesh:
    """The data x latents layout of this process's world; ``latents == 1`` is data
    parallelism alone (no mesh: the world's own group, as without sharding)."""

    data: int
    latents: int
    rank: int  # this process's rank in the world
    device_mesh: DeviceMesh | None = None

    @classmethod
    def of(cls, latent_shards: int, device: torch.device | str = "cpu") -> "Mesh":
        """The mesh for ``latent_shards`` over the current world (``distributed.get_world``)."""
        world = distributed.get_world()
        if isinstance(latent_shards, bool) or not isinstance(latent_shards, int):
            raise SignSAEError(f"train.latent_shards must be an integer, got {latent_shards!r}.")
        if latent_shards < 1 or world % latent_shards:
            raise SignSAEError(
                f"train.latent_shards={latent_shards} does not divide the world of {world} "
                f"rank(s): launch a multiple of {latent_shards} ranks (torchrun "
                f"--nproc_per_node), or set latent_shards to a divisor of {world}."
            )
        rank = distributed.get_rank()
        if latent_shards == 1:
            return cls(world, 1, rank)
        shape = (world // latent_shards, latent_shards)
        mesh = init_device_mesh(torch.device(device).type, shape, mesh_dim_names=DIMS)
        return cls(shape[0], latent_shards, rank, mesh)

    @property
    def data_rank(self) -> int:
        return self.rank // self.latents

    @property
    def latent_rank(self) -> int:
        return self.rank % self.latents

    @property
    def sharded(self) -> bool:
        return self.latents > 1

    def group(self, dim: str) -> Any:
        """The process group along ``dim`` (None: the world's, when unsharded)."""
        return self.device_mesh.get_group(dim) if self.device_mesh is not None else None

    def sum_(self, t: torch.Tensor, dim: str) -> torch.Tensor:
        """Sum ``t`` in place over the ranks along ``dim`` (no autograd); returns it."""
        size = self.data if dim == "data" else self.latents
        if size > 1:
            dist.all_reduce(t, group=self.group(dim))
        return t


class LatentSums:
    """The three operations a shard of an SAE needs (``SAGSAETrainingSAE.latent_sums``), on
    the latent dimension of a mesh: DTensor placements, so torch.distributed does the rest."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.sub = mesh.device_mesh["latents"]

    def total(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum of every shard's ``partial`` (all-reduce); its gradient reaches each shard
        unchanged."""
        return DTensor.from_local(partial, self.sub, [Partial()], run_check=False).full_tensor()

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` itself, read by every shard: its gradient is summed over the shards."""
        dx = DTensor.from_local(x, self.sub, [Replicate()], run_check=False)
        return dx.to_local(grad_placements=[Partial()])

    def total_(self, t: torch.Tensor) -> torch.Tensor:
        """``total`` in place, without autograd (inside the fused step)."""
        return self.mesh.sum_(t, "latents")


# ---- shards of state --------------------------------------------------------------------
def latent_dim(name: str, t: torch.Tensor) -> int | None:
    """The dimension of ``t`` that runs over latents (None: replicated): W_enc's columns,
    the rows of W_dec and of every per-latent vector; b_dec and scalars are shared."""
    if t.ndim == 0 or name.endswith("b_dec"):
        return None
    return 1 if name.endswith("W_enc") else 0


def local_slice(t: torch.Tensor, dim: int | None, mesh: Mesh) -> torch.Tensor:
    """This rank's shard of a full tensor (all of it when replicated)."""
    if dim is None:
        return t
    return t.chunk(mesh.latents, dim)[mesh.latent_rank].clone()


def gathered(t: torch.Tensor, dim: int | None, mesh: Mesh) -> torch.Tensor:
    """The full tensor from every shard's ``t``, on the CPU of every rank of the latent group
    (one tensor at a time: the device never holds more than its shard)."""
    if dim is None or not mesh.sharded:
        return t
    local = t.detach().cpu().contiguous()
    parts = [torch.empty_like(local) for _ in range(mesh.latents)]
    dist.all_gather(parts, local, group=mesh.group("latents"))
    return torch.cat(parts, dim)


def map_state(
    state: dict[str, torch.Tensor], fn: Any, names: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """``fn(tensor, latent dim)`` over a state dict; ``names`` maps keys to parameter names
    (Adam's ``<i>.exp_avg`` -> ``W_enc``), by default the key itself."""
    names = names or {}
    return {k: fn(v, latent_dim(names.get(k, k), v)) for k, v in state.items()}


def gather_state(
    state: dict[str, torch.Tensor], mesh: Mesh, names: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """The 1-process form of a shard's state dict (parameters, Adam's state, a clock)."""
    return map_state(state, lambda t, d: gathered(t, d, mesh), names)


def local_state(
    state: dict[str, torch.Tensor], mesh: Mesh, names: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """This rank's shard of a 1-process state dict (``gather_state``'s inverse), after
    checking that its latents split into the mesh's shards."""
    for key, t in state.items():
        dim = latent_dim((names or {}).get(key, key), t)
        if dim is not None and t.shape[dim] % mesh.latents:
            raise SignSAEError(
                f"{key} has {t.shape[dim]} latents, which do not split into "
                f"train.latent_shards={mesh.latents} equal shards: resume with a shard count "
                f"that divides {t.shape[dim]}."
            )
    return map_state(state, lambda t, d: local_slice(t, d, mesh), names)


def optimizer_names(sae: TrainingSAE, opt: torch.optim.Optimizer) -> dict[str, str]:
    """Adam's flat state keys (``<index>.<name>``, as the trainer stores them) -> parameter
    names; a state's step counter is a scalar (shared)."""
    by_id = {id(p): n for n, p in sae.named_parameters()}
    params = [p for g in opt.param_groups for p in g["params"]]
    keys = ("exp_avg", "exp_avg_sq", "step", "max_exp_avg_sq")
    return {f"{i}.{k}": by_id[id(p)] for i, p in enumerate(params) for k in keys}


def shard(sae: TrainingSAE, mesh: Mesh) -> TrainingSAE:
    """This rank's shard of ``sae`` (a fresh SAE of the same class, d_sae / latents wide) cut
    from rank 0's ``sae`` (broadcast into ``sae`` first, so every shard starts from one SAE
    whatever the ranks' seeds)."""
    if not isinstance(sae, SAGSAETrainingSAE):
        raise SignSAEError(
            f"train.latent_shards > 1 shards SA-GSAE only, not {type(sae).__name__}; train it "
            "with latent_shards: 1 (data parallel). docs/distributed.md says why."
        )
    d_sae = sae.cfg.d_sae
    if d_sae % mesh.latents:
        raise SignSAEError(
            f"d_sae={d_sae} latents do not split into train.latent_shards={mesh.latents} equal "
            f"shards: choose a width divisible by {mesh.latents} (or another shard count)."
        )
    distributed.broadcast_tensors([t.detach() for t in (*sae.parameters(), *sae.buffers())])
    cfg = type(sae.cfg).from_dict({**sae.cfg.to_dict(), "d_sae": d_sae // mesh.latents})
    local = type(sae)(cfg)
    local.load_state_dict(local_state(sae.state_dict(), mesh))
    local.fused, local.compile_step = sae.fused, sae.compile_step
    local.latent_sums = LatentSums(mesh)
    return local


@torch.no_grad()
def unshard(local: TrainingSAE, sae: TrainingSAE, mesh: Mesh) -> None:
    """Copy the trained shards back into the full ``sae`` on every rank."""
    sae.load_state_dict(gather_state(local.state_dict(), mesh))


@torch.no_grad()
def global_norm(
    sharded: list[torch.Tensor], shared: list[torch.Tensor], mesh: Mesh
) -> torch.Tensor:
    """The 2-norm of the whole gradient: the shards' squared norms summed over the latent
    group, plus the shared parameters' once (they are the same on every shard)."""
    sq = torch.nn.utils.get_total_norm(sharded).double().pow(2)
    mesh.sum_(sq, "latents")
    rep = torch.nn.utils.get_total_norm(shared).double().pow(2) if shared else 0.0
    return (sq + rep).sqrt().float()


def clip_gradients(sae: TrainingSAE, max_norm: float, mesh: Mesh) -> None:
    """Clip ``sae``'s gradients to global norm ``max_norm`` as ``clip_grad_norm_`` does, with
    the norm over every shard when sharded."""
    params = [p for p in sae.parameters() if p.grad is not None]
    if not mesh.sharded:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    named = [(n, p) for n, p in sae.named_parameters() if p.grad is not None]
    sharded = [p.grad for n, p in named if latent_dim(n, p) is not None]
    shared = [p.grad for n, p in named if latent_dim(n, p) is None]
    norm = global_norm(sharded, shared, mesh)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
