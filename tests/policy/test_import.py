"""Installing this domain alone: its module, core as its dependency, the namespace."""

import importlib
import importlib.metadata
import re
from pathlib import Path

DOMAIN = "policy"
DISTRIBUTION = "fewstep-policy"


def test_domain_module_imports_and_has_a_docstring():
    module = importlib.import_module(f"fewstep.{DOMAIN}")
    assert module.__doc__ is not None and module.__doc__.strip()


def test_core_is_installed_as_a_declared_dependency():
    requires = importlib.metadata.requires(DISTRIBUTION) or []
    names = {re.match(r"[A-Za-z0-9._-]+", req).group(0).lower() for req in requires}
    assert "fewstep-core" in names
    core = importlib.import_module("fewstep.core")
    assert core.__name__ == "fewstep.core"
    assert importlib.metadata.version("fewstep-core")


def test_fewstep_is_a_namespace_package():
    import fewstep

    assert getattr(fewstep, "__file__", None) is None
    portions = list(fewstep.__path__)
    assert len(portions) >= 1
    # No member may ship fewstep/__init__.py, or it would hide the other members.
    assert not any((Path(p) / "__init__.py").exists() for p in portions)
