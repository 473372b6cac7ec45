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
