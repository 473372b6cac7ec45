"""``fewstep-video`` lists and runs only video recipes."""

from __future__ import annotations


def test_cli_lists_only_video_recipes(capsys):
    from fewstep.video.cli import main

    assert main(["list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert "video-self-forcing" in names
    assert all(n.startswith("video-") for n in names if "-" in n), names
