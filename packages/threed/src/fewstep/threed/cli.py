"""``fewstep-threed``: the fewstep command restricted to threed recipes."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from fewstep.core.cli import main as core_main

    return core_main(argv, prog="fewstep-threed", prefix="threed-")


if __name__ == "__main__":
    raise SystemExit(main())
