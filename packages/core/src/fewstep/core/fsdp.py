"""Fully sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``) for the
trainer's roles.

With ``TrainConfig.parallel = "fsdp"`` and WORLD_SIZE > 1 every role the objective builds
(trainable roles and the frozen roles that track them, such as a consistency EMA target) and
the student's EMA are sharded: each rank keeps a dim-0 slice of every parameter
(a ``DTensor`` placed ``Shard(0)``), of its gradient and of its AdamW moments. Modules outside
the roles (teacher, VAE, text encoders) are never wrapped, nor are the teacher's parameters
should a role hold them: they stay replicated. On a single process nothing is sharded and
training runs exactly as with ``parallel = "ddp"``.

Why these choices:

* Wrap policy. Each shard group is all-gathered in one collective before its forward and
  freed after it. By default every block holding at least ``min_params`` parameters not
  already in a smaller group becomes a group (accelerate's ``size_based_auto_wrap_policy``),
  bottom-up, and then the role itself; naming block classes (``class_names``) instead
  shards every module of those classes, as accelerate's ``transformer_cls_names_to_wrap``.
* A role that is a container without a ``forward`` (DMD2's ``ModuleDict`` critic of a score
  and a GAN head) is never called as a whole, so its FSDP pre-forward hook would never run:
  its children are sharded as roots of their own.
* ``reshard_after_forward=True`` for every group, the root included (FSDP2 keeps the root
  unsharded after forward by default, expecting a backward to follow): objectives call
  roles under ``no_grad`` with no backward, and a root left unsharded keeps its full
  parameters registered between steps, where the EMA update and state dicts expect shards.
* Gradients: FSDP reduce-scatters (means over ranks) in backward, so the trainer's hand
  all-reduce only runs for trainable parameters that stayed unsharded. The trainer calls
  ``backward(inputs=...)`` per role so that a loss never leaks gradients into another role;
  under FSDP the tensors autograd reaches are the per-group *unsharded* parameters, not the
  registered shards, which ``backward_inputs`` returns (from FSDP2's internals: no public
  accessor exists; the parity test in tests/core/test_fsdp.py fails if they change).
* EMA: the EMA copy is taken before sharding and sharded exactly like the student, so
  ``ema_update_`` blends local shards (elementwise, no communication, 1/world of the
  memory). Frozen roles that track the student (a consistency target, a progressive
  round teacher) are sharded the same way for the same reason. Evaluation and export
  gather full copies of the student and its EMA onto rank 0 (``full_state_dict`` into a
  ``meta_skeleton`` taken before sharding, ``plain_copy``).
* Methods other than ``forward`` that objectives call on a role (``features``) are
  registered with FSDP so that they all-gather too (``register_forward_method``).
* Checkpoints hold full (unsharded) tensors in the same safetensors layout as an unsharded
  run, so they load into a plain module and resume works across ddp <-> fsdp.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from fewstep.core.distributed import DistInfo

# parallel mode -> what it does (TrainConfig.parallel); a registry, so errors list the choices
PARALLEL_MODES = {
    "ddp": "every rank holds full roles; gradients all-reduced by hand after each backward",
    "fsdp": "roles sharded with FSDP2 (fully_shard); gradients reduce-scattered in backward",
}

# Denoiser methods objectives call directly on a role (not through forward): FSDP must
# all-gather around them too
FORWARD_METHODS = ("features",)


def check_parallel(mode: str) -> None:
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {sorted(PARALLEL_MODES)}, got {mode!r}")


def _dtensor_cls():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(t: Tensor) -> bool:
    return isinstance(t, _dtensor_cls())


# --------------------------------------------------------------------------- wrapping


def _has_forward(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward


def shard_roots(module: nn.Module) -> list[nn.Module]:
    """The modules to shard as FSDP roots: ``module`` itself if it defines ``forward``,
    otherwise (a ``ModuleDict`` / ``ModuleList`` whose children are called one by one) the
    roots of each child holding parameters."""
    if _has_forward(module):
        return [module]
    return [
        r for c in module.children() if any(True for _ in c.parameters()) for r in shard_roots(c)
    ]


def wrap_targets(
    root: nn.Module, min_params: int, class_names: Iterable[str] = ()
) -> list[nn.Module]:
    """Submodules of ``root`` (root excluded) that become shard groups of their own, in
    post-order (children before parents, as ``fully_shard`` must be called bottom-up).

    With ``class_names``: every module whose class name is listed. Otherwise size-based:
    a module whose parameters not already claimed by a group below it number at least
    ``min_params`` (accelerate's ``size_based_auto_wrap_policy``). Containers without a
    ``forward`` of their own are never targets."""
    names = set(class_names)
    targets: list[nn.Module] = []

    def visit(m: nn.Module) -> int:
        """Unclaimed parameter count of ``m``'s subtree after wrapping inside it."""
        below = sum(visit(c) for c in m.children())
        own = sum(p.numel() for p in m.parameters(recurse=False))
        if m is root:
            return below + own
        if names:
            wrap = type(m).__name__ in names
        else:
            wrap = below + own >= min_params
        # a container without forward (ModuleList of diffusers blocks) cannot be its own
        # group: its unclaimed parameters go up to the first module that runs them
        if wrap and below + own > 0 and _has_forward(m):
            targets.append(m)
            return 0
        return below + own

    visit(root)
    return targets


def check_wrap_classes(modules: Iterable[nn.Module], class_names: Iterable[str]) -> None:
    """Every named block class must occur in some role: a misspelt name would otherwise
    silently leave each role one big shard group."""
    present = {type(m).__name__ for module in modules for m in module.modules()}
    missing = sorted(set(class_names) - present)
    if missing:
        raise ValueError(
            f"fsdp_wrap_classes {missing} match no module of the roles; their classes are "
            f"{sorted(present)}"
        )


def make_mesh(info: DistInfo):
    """A 1-D device mesh over all ranks, on the trainer's device type (cpu / cuda)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(info.device.type, (info.world_size,))


def shard_module_(
    module: nn.Module,
    mesh,
    min_params: int,
    class_names: Iterable[str] = (),
    keep: Iterable[nn.Parameter] = (),
) -> list[nn.Module]:
    """Apply ``fully_shard`` in place: the wrap targets of each shard root, then the root.
    Returns the roots. Parameters in ``keep`` (the teacher's, should a role hold the teacher
    module itself) stay replicated and are never reduced."""
    from torch.distributed.fsdp import fully_shard

    class_names = tuple(class_names)
    keep = set(keep)
    roots = shard_roots(module)
    for root in roots:
        blocks = [*wrap_targets(root, min_params, class_names), root]
        for block in blocks:
            ignored = {p for p in block.parameters() if p in keep} or None
            fully_shard(block, mesh=mesh, reshard_after_forward=True, ignored_params=ignored)
        for block in blocks:  # e.g. ToyMLP.features, called by its denoiser's features
            for name in FORWARD_METHODS:
                if callable(getattr(block, name, None)):
                    register_forward_method(block, name)
    return roots


def register_forward_method(module: nn.Module, name: str) -> None:
    """Make ``module.<name>(...)`` all-gather and free parameters around itself like
    ``forward`` (``register_fsdp_forward_method``), except when called from inside the
    module's own forward (``ToyMLP.forward`` calls ``self.features``): the parameters are
    unsharded already, and the method's post-forward would free them mid-forward."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    plain = getattr(module, name)
    register_fsdp_forward_method(module, name)
    hooked = getattr(module, name)
    depth = [0]  # > 0 while the module's forward or the method runs

    def enter(*_):
        depth[0] += 1

    def leave(*_):
        depth[0] -= 1

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)

    def call(*args, **kwargs):
        if depth[0]:
            return plain(*args, **kwargs)
        enter()
        try:
            return hooked(*args, **kwargs)
        finally:
            leave()

    setattr(module, name, call)


def meta_skeleton(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters live on the meta device (no memory) and
    whose buffers are real copies: the unsharded structure that full state dicts load into
    on rank 0 (FSDP2 modules refuse ``deepcopy``, so this is taken before sharding)."""
    memo: dict[int, Any] = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in module.parameters()
    }
    return copy.deepcopy(module, memo)


def plain_copy(skeleton: nn.Module, full: dict[str, Tensor], device: torch.device) -> nn.Module:
    """An unsharded module on ``device`` from a meta ``skeleton`` and a full state dict."""
    m = copy.deepcopy(skeleton)
    m.load_state_dict(full, strict=True, assign=True)
    return m.to(device)


# --------------------------------------------------------------------------- gradients


def _param_groups(module: nn.Module) -> list:
    state = module._get_fsdp_state()  # FSDP2 internals; the parity test guards them
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # torch < 2.8 held one group per state
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return list(groups)


def backward_inputs(module: nn.Module, params: list[nn.Parameter]) -> list[Tensor]:
    """What a role's ``backward(inputs=...)`` must name under FSDP.

    FSDP2 registers the sharded ``DTensor`` parameters on the module but runs forward with
    per-group unsharded parameters (the same ``nn.Parameter`` objects after the first
    all-gather), so those are the leaves of the autograd graph; their gradients are
    reduce-scattered into the shards' ``.grad`` by FSDP's post-backward hook. Trainable
    parameters that stayed unsharded are returned as they are."""
    from torch.distributed.fsdp import FSDPModule

    out = [p for p in params if not is_sharded(p)]
    seen = set(map(id, out))
    for m in module.modules():
        if not isinstance(m, FSDPModule):
            continue
        for group in _param_groups(m):
            for fp in group.fsdp_params:
                u = getattr(fp, "_unsharded_param", None)  # absent before the 1st all-gather
                if u is not None and u.requires_grad and id(u) not in seen:
                    seen.add(id(u))
                    out.append(u)
    return out


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over sharded and unsharded parameters: the norm of
    the full (global) gradient. Returns it as a plain scalar tensor."""
    sharded = [p for p in params if is_sharded(p)]
    plain = [p for p in params if not is_sharded(p)]
    if not sharded or not plain:  # torch reduces the DTensor shards' norm itself
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if is_sharded(norm) else norm
    parts = []
    for group in (sharded, plain):
        grads = [p.grad for p in group if p.grad is not None]
        if grads:
            n = torch.nn.utils.get_total_norm(grads)
            parts.append((n.full_tensor() if is_sharded(n) else n).float())
    if not parts:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack([p.to(parts[0].device) for p in parts]))
    for group in (sharded, plain):
        if group:
            # a python float multiplies DTensor and plain gradients alike
            coef = min(1.0, max_norm / (float(total) + 1e-6))
            for p in group:
                if p.grad is not None:
                    p.grad.mul_(coef)
    return total


# --------------------------------------------------------------------------- state dicts


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The full (unsharded) state dict on CPU on rank 0, ``{}`` on the others. Collective:
    every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=opts)


def load_full_state_dict_(module: nn.Module, full: dict[str, Tensor]) -> None:
    """Load a full state dict (every rank holds it) strictly into a possibly sharded module:
    each rank keeps its slice. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, full, options=StateDictOptions(full_state_dict=True, strict=True))


def full_optimizer_state_dict(optimizer: torch.optim.Optimizer, main: bool) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor gathered to its full shape
    (on CPU, on rank 0; ``{}`` on the others). Collective.

    The layout is exactly ``torch.optim``'s (states keyed by parameter index), not
    ``get_optimizer_state_dict``'s (keyed by parameter name), so a checkpoint from a sharded
    run and one from an unsharded run are the same files."""
    sd = optimizer.state_dict()
    state = {}
    for idx in sorted(sd["state"]):  # the same order of collectives on every rank
        entry = {}
        for k in sorted(sd["state"][idx]):
            v = sd["state"][idx][k]
            if is_sharded(v):
                v = v.full_tensor()
            entry[k] = v.detach().cpu() if isinstance(v, Tensor) and main else v
        state[idx] = entry
    return {"state": state, "param_groups": sd["param_groups"]} if main else {}


def shard_like(full: Tensor, param: Tensor) -> Tensor:
    """This rank's slice of ``full`` laid out as the sharded ``param`` (no communication:
    every rank holds ``full``)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        full.to(param.device), param.device_mesh, param.placements, src_data_rank=None
    )


def load_full_optimizer_state_dict_(optimizer: torch.optim.Optimizer, full: dict) -> None:
    """Load a full (``torch.optim``-layout) state dict into an optimizer over sharded
    parameters: each full moment is cut into the slice its parameter holds (no
    communication: every rank read the same file)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for idx, entry in full["state"].items():
        p = params[int(idx)]
        state[idx] = {
            k: shard_like(v, p)
            if is_sharded(p) and isinstance(v, Tensor) and v.shape == p.shape
            else v
            for k, v in entry.items()
        }
    optimizer.load_state_dict({"state": state, "param_groups": full["param_groups"]})


class GatheredAway(nn.Module):
    """Stands on rank 0, after training, for a sharded role that was not gathered (only the
    student and its EMA are): calling it alone on rank 0 would wait forever for the other
    ranks' shards, so it fails with a message instead."""

    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            f"role {self.role!r} is sharded across processes (parallel='fsdp'); only the "
            "student and its EMA are gathered onto rank 0 for evaluation and export"
        )
