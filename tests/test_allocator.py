"""``keep_freed_memory``: glibc keeps the memory a step frees for the next step, instead of
giving it back and faulting it in again; the user's own allocator settings win."""

import os
import subprocess
import sys

import pytest

from smk_lightning.cli.allocator import user_tuned_malloc

# 30 blocks of 2 MB allocated, touched and freed, 10 times after two warm-up rounds: what a
# training step does with its activations. Prints the page faults per round.
PATTERN = """
import resource, sys, torch
from smk_lightning.cli.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():
    blocks = [torch.ones(1 << 19) for _ in range(30)]
    del blocks
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)")


def _python(code: str, *args: str, **env: str) -> str:
    """stdout of ``python -c code args`` in this environment without its malloc settings, plus ``env``."""
    clean = {k: v for k, v in os.environ.items() if not user_tuned_malloc({k: v})}
    return subprocess.run([sys.executable, "-c", code, *args], env=clean | env, capture_output=True, text=True,
                          check=True).stdout


def _faults_per_round(mode: str) -> float:
    return float(_python(PATTERN, mode).split()[-1])


@glibc_only
def test_freed_blocks_are_reused_without_page_faults():
    kept = _faults_per_round("keep")  # of 15 360 pages touched a round
    assert kept < 200, f"{kept} page faults per round with the thresholds set"
    # glibc's own dynamic thresholds fault a share of them in again every round (if a glibc
    # stops doing so, the setting is no longer needed: this says so)
    default = _faults_per_round("default")
    assert default > 2 * kept, f"glibc's defaults: {default} page faults per round, {kept} with the thresholds set"


@glibc_only
@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}])
def test_the_users_own_settings_are_left_alone(env):
    code = "from smk_lightning.cli.allocator import keep_freed_memory; print(keep_freed_memory())"
    assert _python(code, **env).strip() == "False"


def test_user_tuned_malloc_reads_the_malloc_variables_and_tunables():
    assert not user_tuned_malloc({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.pthread.rseq=0"})
    assert user_tuned_malloc({"MALLOC_MMAP_THRESHOLD_": "1"})
    assert user_tuned_malloc({"GLIBC_TUNABLES": "glibc.pthread.rseq=0:glibc.malloc.trim_threshold=1"})
