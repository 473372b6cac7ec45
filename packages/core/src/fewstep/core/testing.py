"""Checks every domain package's tests share (each package is tested in an environment of
its own, so they cannot import one another's test files)."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from pathlib import Path


def check_domain_package(domain: str) -> None:
    """``fewstep.<domain>`` imports and is documented, declares fewstep-core as a dependency
    that is installed, and ``fewstep`` stays a namespace package (no member ships
    ``fewstep/__init__.py``, which would hide the others)."""
    module = importlib.import_module(f"fewstep.{domain}")
    assert module.__doc__ and module.__doc__.strip(), f"fewstep.{domain} has no docstring"
    dist = f"fewstep-{domain.replace('_', '-')}"
    requires = importlib.metadata.requires(dist) or []
    names = {re.match(r"[A-Za-z0-9._-]+", r).group(0).lower() for r in requires}
    assert "fewstep-core" in names, f"{dist} does not declare fewstep-core"
    assert importlib.metadata.version("fewstep-core")
    import fewstep

    assert getattr(fewstep, "__file__", None) is None, "fewstep must be a namespace package"
    portions = list(fewstep.__path__)
    assert portions and not any((Path(p) / "__init__.py").exists() for p in portions)


def run_ranks(target, world: int, root, timeout: float = 180.0) -> None:
    """Run ``target(rank, root)`` in ``world`` forked CPU processes with the environment that
    torchrun / ``accelerate launch`` set (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), one
    torch thread each; raise with the workers' tracebacks if any fails or hangs. Forked (not
    spawned) workers inherit the imported modules, so no worker pays a fresh ``import torch``."""
    import multiprocessing as mp
    import os
    import socket
    import sys
    import traceback
    from pathlib import Path

    import torch
    import torch.distributed as dist

    def worker(rank: int, port: int) -> None:
        code = 0
        try:
            torch.set_num_threads(1)
            os.environ.update(
                RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
            )  # fmt: skip
            target(rank, root)
        except BaseException:
            Path(root, f"error_rank{rank}.txt").write_text(traceback.format_exc())
            code = 1
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)  # skip the parent's (pytest's) exit handlers in the fork

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the first AdamW imports torch._dynamo: do it once here rather than in every fork
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=worker, args=(r, port)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=timeout)
    finally:
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
            p.join()
    errors = sorted(Path(root).glob("error_rank*.txt"))
    if errors:
        raise AssertionError("\n".join(e.read_text() for e in errors))
    if hung or any(p.exitcode != 0 for p in procs):
        raise AssertionError(f"workers hung or failed: exit codes {[p.exitcode for p in procs]}")
