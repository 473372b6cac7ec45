import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A private fewstep cache for the whole session (teachers and classifier train once)."""
    path = tmp_path_factory.mktemp("fewstep-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("FEWSTEP_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def tiny():
    """Options for a teacher small and short enough for CI (quality is the benchmark's job)."""
    return TINY


_TINY = (
    "--teacher.steps 40 --teacher.sample_steps 4 --eval-samples 60 --probe-samples 30 "
    "--classifier-steps 300 --threads 1 --device cpu --train.batch_size 16 "
    "--train.progress false"
)
TINY = _TINY.split()  # noqa: SIM905 - one readable line of options
