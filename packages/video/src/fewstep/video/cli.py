"""``fewstep-video``: the fewstep command restricted to video recipes."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from fewstep.core.cli import main as core_main

    return core_main(argv, prog="fewstep-video", prefix="video-")


if __name__ == "__main__":
    raise SystemExit(main())
