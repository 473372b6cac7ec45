"""The nerfstudio plugin: entry points resolve to this package's method specifications, the
module never imports nerfstudio when imported, and (nerfstudio installed) nerfstudio's own
discovery lists the methods."""

import importlib
import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fewstep.threed import nerfstudio_plugin as plugin

GROUP = "nerfstudio.method_configs"
PYPROJECT = Path(__file__).resolve().parents[2] / "packages" / "threed" / "pyproject.toml"


def _entry_points() -> dict[str, str]:
    """name -> "module:attr" of our nerfstudio entry points: from the installed metadata when
    they are registered there, else from packages/threed/pyproject.toml."""
    eps = {
        ep.name: ep.value
        for ep in importlib.metadata.entry_points(group=GROUP)
        if ep.value.startswith("fewstep.")
    }
    if eps:
        return eps
    data = tomllib.loads(PYPROJECT.read_text())
    return dict(data["project"].get("entry-points", {}).get(GROUP, {}))


def test_entry_points_name_every_method_and_resolve_to_this_module():
    eps = _entry_points()
    assert set(eps) == set(plugin.METHODS), (
        f"pyproject [project.entry-points.{GROUP!r}] should list {sorted(plugin.METHODS)}, "
        f"got {eps}"
    )
    for name, value in eps.items():
        module, attr = value.split(":")
        assert module == plugin.__name__
        assert attr == plugin.METHODS[name][0]
        assert attr in dir(importlib.import_module(module))  # resolvable (lazily built)


def test_importing_the_plugin_does_not_import_nerfstudio():
    code = (
        "import sys, fewstep.threed.nerfstudio_plugin as m; "
        "assert 'nerfstudio' not in sys.modules, 'imported nerfstudio'; "
        "print(sorted(m.METHODS))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "fewstep-pvd" in out.stdout


def test_unknown_attribute_and_missing_extra_errors():
    with pytest.raises(AttributeError, match="no attribute"):
        plugin.not_a_method  # noqa: B018
    try:
        import nerfstudio  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"fewstep-threed\[nerfstudio\]"):
            plugin.fewstep_pvd  # noqa: B018


def test_nerfstudio_discovers_the_methods():
    pytest.importorskip("nerfstudio")
    from nerfstudio.plugins.registry import discover_methods
    from nerfstudio.plugins.types import MethodSpecification

    methods, descriptions = discover_methods()
    for name, (attr, _) in plugin.METHODS.items():
        assert name in methods, sorted(methods)
        assert isinstance(getattr(plugin, attr), MethodSpecification)
        assert methods[name].method_name == name
