"""``fewstep-lidar`` lists and runs only lidar recipes."""

from __future__ import annotations


def test_cli_lists_only_lidar_recipes(capsys):
    from fewstep.lidar.cli import main

    assert main(["list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert "lidar-dpo" in names
    assert all(n.startswith("lidar-") for n in names if "-" in n), names
