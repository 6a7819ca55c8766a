"""benchmarks/accelerator.py --smoke: every section runs on the CPU and prints its JSON lines.

The script is what a session with a lent GPU runs once, so this checks on the CPU that every
section (the real train step in both dtypes, the loader over the step, the profile and its
ops, the transform policies, sliding-window inference) gets to print a measurement. The
smoke sweep is cut to one case, bfloat16 at batch 2 (what the accelerator run centres on),
shared by the train-step, end-to-end and profile sections: compiling the real step is most
of the test's time (~20 s of CPU for a bfloat16 case on a CPU without AVX-512).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cpu_env

pytestmark = pytest.mark.slow  # compiles the real step

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "accelerator.py"
REQUIRED = ("what", "section", "impl", "shape", "dtype", "device", "cubes_per_s")


def run_smoke(tmp_path: Path, profile: Path) -> list[dict]:
    # No hugepage re-execution (hostenv): it only costs a second start-up here.
    env = cpu_env(TRANSVW_HUGEPAGE_MALLOC="0")  # one device, as the check runs on one accelerator
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--profile", str(profile), "--batches", "2",
         "--dtypes", "bfloat16", "--tmpdir", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    out = [line for line in proc.stdout.splitlines() if line.strip()]
    assert out, proc.stderr[-4000:]
    return [json.loads(line) for line in out]  # every stdout line is one JSON object


def test_smoke_every_section_measures(tmp_path):
    profile = tmp_path / "profile"
    lines = run_smoke(tmp_path, profile)

    for line in lines:
        missing = [k for k in REQUIRED if k not in line]
        assert not missing, (missing, line)
        assert "error" not in line, line
        assert "skipped" not in line, line
    sections = {line["section"] for line in lines}
    assert {"train_step", "end_to_end", "profile", "transforms", "inference"} <= sections

    train = [line for line in lines if line["what"] == "train_step/real"]
    assert [line["dtype"] for line in train] == ["bfloat16"]
    for line in train:
        assert line["cubes_per_s"] > 0 and line["s_per_step"] > 0
        assert line["gflop_per_step"] > 0 and line["flops_source"]
        assert line["peak_tflops"] > 0 and line["peak_basis"]
        assert line["mfu"] > 0

    e2e = {line["what"]: line for line in lines if line["section"] == "end_to_end"}
    assert e2e["end_to_end/bare_step"]["cubes_per_s"] > 0
    assert e2e["end_to_end/loader"]["cubes_per_s"] > 0
    assert e2e["end_to_end/ratio"]["ratio"] > 0

    policies = {line["what"]: line for line in lines if line["section"] == "transforms"}
    assert set(policies) == {"transforms/policy/transvw", "transforms/policy/genesis"}
    assert all(line["cubes_per_s"] > 0 for line in policies.values())

    (inference,) = [line for line in lines if line["section"] == "inference"]
    assert inference["voxels_per_s"] > 0

    (summary,) = [line for line in lines if line["what"] == "profile"]
    ops = [line for line in lines if line["what"] == "profile/op"]
    assert any(p.is_file() for p in profile.rglob("*")), "the profile directory is empty"
    assert summary["files"], summary
    assert summary["source"].startswith(("xplane", "trace json")), summary["source"]  # parsed, no fallback
    assert 1 <= len(ops) == min(10, summary["ops"])
    assert [op["rank"] for op in ops] == list(range(1, len(ops) + 1))
    assert all(op["op"] and op["total_ms"] > 0 for op in ops)
    assert ops == sorted(ops, key=lambda op: -op["total_ms"])

    (done,) = [line for line in lines if line["what"] == "done"]
    assert done["failed_units"] == 0 and done["skipped_units"] == 0
