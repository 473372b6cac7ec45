"""``fewstep-image``: the fewstep command restricted to image recipes."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from fewstep.core.cli import main as core_main

    return core_main(argv, prog="fewstep-image", prefix="image-")


if __name__ == "__main__":
    raise SystemExit(main())
