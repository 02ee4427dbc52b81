"""Pinned losses (as torchtune's recipe tests do): a short fixed-seed run of a main script must log
the same losses as recorded, so a silent numerical change (a library update, a changed default, a
data or model change) fails CI. Running twice also checks determinism on CPU.

When a change is meant to alter the numbers, re-record and commit the file with the change:

    UPDATE_REFERENCE_LOSSES=1 pytest tests/test_reference_losses.py
"""

import json
import os
from pathlib import Path

import pytest

from conftest import read_metrics, run_script, train_losses

REFERENCE = Path(__file__).with_name("reference_losses.json")
RUNS = {
    "trainer/getting_started.py": ["--max_steps", "30", "--logging_steps", "5", "--eval_strategy", "no", "--save_strategy", "no"],
    "basic/custom_loop.py": ["--max_steps", "30", "--logging_steps", "5"],
}


@pytest.mark.parametrize("script", list(RUNS))
def test_losses_match_the_reference_and_repeat_exactly(workdir, script):
    losses = []
    for attempt in (1, 2):
        out = workdir / f"output/reference/{script.replace('/', '_')}-{attempt}"
        run_script(script, *RUNS[script], "--seed", "42", "--output_dir", str(out), cwd=workdir)
        losses.append({str(k): v for k, v in train_losses(read_metrics(out)).items()})
    assert losses[0] == losses[1], "the same seed gave different losses on CPU"
    reference = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {}
    if os.environ.get("UPDATE_REFERENCE_LOSSES") == "1":
        REFERENCE.write_text(json.dumps({**reference, script: losses[0]}, indent=2, sort_keys=True) + "\n")
        pytest.skip(f"recorded the reference losses of {script}")
    assert script in reference, f"no reference for {script}: record it with UPDATE_REFERENCE_LOSSES=1"
    # Float32 on CPU: only BLAS summation order can differ between machines (~1e-6 relative).
    assert losses[0] == pytest.approx(reference[script], rel=1e-4)
