"""benchmarks/tools/core_ab.sh, the A/B tool behind docs/performance.md's CPU-core figures: two
builds of the same tree, compiled separately and run alternately in one process, must give the
same checksum of every output (out, lse, dq, dk, dv in fp32 and bf16): the tool's "equal
checksums = bitwise equal results" holds, and the core is deterministic across builds and
calls."""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_two_builds_of_one_tree_give_one_checksum():
    env = dict(os.environ, BATCH="1")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "tools", "core_ab.sh"), "1", "16", ".", "."],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sums = re.findall(r"sum ([0-9a-f]{16})", proc.stdout)
    assert len(sums) == 2 and sums[0] == sums[1], proc.stdout
