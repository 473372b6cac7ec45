"""``fewstep-protein`` lists and runs only protein recipes."""

from __future__ import annotations


def test_cli_lists_only_protein_recipes(capsys):
    from fewstep.protein.cli import main

    assert main(["list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert "protein-sid" in names
    assert all(n.startswith("protein-") for n in names if "-" in n), names
