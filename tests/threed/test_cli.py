"""``fewstep-threed`` lists and runs only threed recipes."""

from __future__ import annotations


def test_cli_lists_only_threed_recipes(capsys):
    from fewstep.threed.cli import main

    assert main(["list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert "threed-sds" in names
    assert all(n.startswith("threed-") for n in names if "-" in n), names
