"""``fewstep-protein``: the fewstep command restricted to protein recipes."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from fewstep.core.cli import main as core_main

    return core_main(argv, prog="fewstep-protein", prefix="protein-")


if __name__ == "__main__":
    raise SystemExit(main())
