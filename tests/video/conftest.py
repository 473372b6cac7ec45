"""Shared settings of the video recipe tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def self_forcing_tiny() -> list[str]:
    """Tiny ``video-self-forcing`` settings (also the base of ``video-livetalk``'s)."""
    return [
        "--teacher.data.videos", "12", "--teacher.data.frames", "4", "--teacher.data.size", "16",
        "--teacher.dim", "32", "--teacher.depth", "1", "--teacher.heads", "2",
        "--teacher.steps", "3", "--teacher.batch_size", "4",
        "--chunk_frames", "2", "--window", "1",
        "--init.num_pairs", "8", "--init.teacher_steps", "4",
        "--init.train.steps", "3", "--init.train.batch_size", "4", "--init.train.progress", "false",
        "--dmd.student_steps", "2", "--dmd.first_chunk_steps", "3",
        "--dmd.fake_updates_per_student", "2",
        "--train.steps", "3", "--train.batch_size", "2", "--train.progress", "false",
        "--eval.samples", "2", "--eval.teacher_steps", "4", "--eval.long_chunks", "4",
        "--eval.classifier.videos", "8", "--eval.classifier.width", "4",
        "--eval.classifier.features", "8", "--eval.classifier.steps", "2",
        "--eval.classifier.batch_size", "4",
    ]  # fmt: skip
