"""`scripts/gpu_check.sh` proven before a GPU arrives: its --dry-run runs every stage on the CPU at tiny sizes and
writes the files the GPU run will (at most 8, in the results folder itself); the GPU run's plan fits the machine it
gets (9 minutes in all, each stage under its own time limit, fastai from .whl/, the issue's configuration)."""
from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
FILES = {"summary.md", "pipeline.md", "pipeline.json", "syncdebug.txt", "tests.txt", "bench.md", "rest.txt",
         "log.txt"}


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def test_the_dry_run_runs_every_stage_and_writes_what_the_gpu_run_writes(tmp_path):
    res = tmp_path / "results"
    p = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(res)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env=_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    files = [f.relative_to(res) for f in res.rglob("*") if f.is_file()]
    assert {str(f) for f in files} == FILES and len(files) <= 8 and all(len(f.parts) <= 2 for f in files)
    assert not [d for d in res.rglob("*") if d.is_dir()]
    summary = (res / "summary.md").read_text()
    for stage in ("pipeline", "syncdebug", "tests", "bench", "rest"):
        assert re.search(rf"^\| {stage} \| 0 \| \d+ \| \d+ \|$", summary, re.M), stage
    result = json.loads((res / "pipeline.json").read_text())
    assert [r["pipeline"] for r in result["loaders"]] == ["pil", "device", "cached"]
    package = [r for r in result["rows"] if r["loop"] == "package" and r["data"] == "real"]
    assert len(package) == 3 and all(r["reads_per_step"] == r["blocking_copies_per_step"] == 0 for r in package)
    for pipeline in ("pil", "device", "cached"):  # the goals' figures, in the summary too
        assert f"| {pipeline} | loader alone | " in summary and f"| {pipeline} | frozen package | " in summary
    sync = (res / "syncdebug.txt").read_text()
    assert sync.count("host reads 0, blocking copies 0") == 3 and "OK: no host wait" in sync
    assert "passed" in (res / "tests.txt").read_text() and "passed" in (res / "rest.txt").read_text()
    assert "| unfrozen (baseline) | fp32 | contiguous |" in (res / "bench.md").read_text()
    assert "== pipeline" in (res / "log.txt").read_text()


def test_a_wrong_call_says_how_to_call_it(tmp_path):
    p = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60, env=_env())
    assert p.returncode == 2 and "Usage: scripts/gpu_check.sh [--dry-run] RESULTS_DIR" in p.stderr
    assert ".whl/" in p.stderr and "wheels.sh" in p.stderr


def test_the_gpu_run_fits_the_machine_it_gets():
    """9 minutes in all (each stage's limit, the rest taking what remains), most valuable first, fastai from .whl/
    when missing, notebooks left out; the pipeline stage measures the issue's configuration with at least 40
    timed steps per cell and the package Learner."""
    from tp3_fastai.bench.gpucheck import DRY_RUN, CheckConfig

    text = SCRIPT.read_text()
    budget = int(re.search(r"^BUDGET=(\d+)", text, re.M).group(1))
    limits = dict(re.findall(r"T_(\w+)=(\d+)", text))
    assert budget + 10 <= 9 * 60 and sum(int(v) for v in limits.values()) <= budget
    assert 'if [ "$limit" -gt "$left" ]; then limit=$left; fi' in text  # no stage runs past the budget
    runs = re.findall(r"^\s*stage (\w+) ", text, re.M)
    assert runs == ["install", "device", "pipeline", "syncdebug", "tests", "bench", "rest"]
    assert 'timeout --signal=INT --kill-after=10 "$limit"' in text and "--ignore=tests/test_notebooks.py" in text
    assert "pip install -q --no-index --no-deps" in text and ".whl/*.whl" in text and "--target /tmp/site" in text
    gpu = CheckConfig()
    assert (gpu.arch, gpu.size, gpu.bs, gpu.modes) == ("resnet50", 224, 128, ("unfrozen", "frozen"))
    assert gpu.steps * gpu.repeats >= 40 and "package" in gpu.loops and gpu.pipelines == ("pil", "device", "cached")
    assert asdict(DRY_RUN).keys() == asdict(gpu).keys() and DRY_RUN.device == "cpu"
