"""What a worker's settings leave unset is decided by the platform vLLM runs on."""

from core.settings import WorkerSettings
from workers.engine import with_platform_defaults


def test_a_cpu_build_runs_eager_float32_unless_told_otherwise() -> None:
    # The suite runs vLLM's CPU build: its bfloat16 kernels answer wrong on some hosts.
    decided = with_platform_defaults(WorkerSettings())
    assert (decided.dtype, decided.enforce_eager) == ("float32", True)
    told = with_platform_defaults(WorkerSettings(dtype="bfloat16", enforce_eager=False))
    assert (told.dtype, told.enforce_eager) == ("bfloat16", False)
    half = with_platform_defaults(WorkerSettings(dtype="auto"))
    assert (half.dtype, half.enforce_eager) == ("auto", True)
