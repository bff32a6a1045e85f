"""How a command ends when it does not finish: Ctrl-C mid-training exits 130 with the run folder kept and a line
saying so; a device this machine lacks is refused before any work with exit 2 (the suite hides any GPU from the
processes it starts, see conftest.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TP3 = str(Path(sys.executable).parent / "tp3")


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))


def test_ctrl_c_exits_130_and_keeps_what_finished(tmp_path):
    run = tmp_path / "r"
    p = subprocess.Popen([TP3, "mnist", "--archs", "cnn", "--epochs", "20", "--out", str(run), "--device", "cpu"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 300
    for line in p.stdout:  # two epochs done: the first one's checkpoint and row are surely written
        if line.startswith("cnn epoch 2/20") or time.monotonic() > deadline:
            break
    os.kill(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "interrupted: what finished so far is in the run folder" in err and "Traceback" not in err
    assert (run / "config.json").is_file() and (run / "checkpoints" / "cnn" / "last.pth").is_file()
    rows = (run / "metrics_cnn.csv").read_text().splitlines()
    assert rows[0].startswith("epoch") and 3 <= len(rows) < 21  # the finished epochs, not all 20


NO_GPU = "error: device 'cuda' was asked for but this machine has no CUDA GPU: use --device cpu (or auto)"


def test_a_gpu_this_machine_lacks_is_refused_before_any_work(tmp_path, capsys):
    """Through `tp3` in a process of its own for one command, in this process for the others (same code path,
    without another start-up of torch and fastai)."""
    from tp3_fastai.cli import main as tp3

    out = tmp_path / "mnist"
    t = time.monotonic()
    p = subprocess.run([TP3, "mnist", "--epochs", "1", "--device", "cuda", "--out", str(out)], capture_output=True,
                       text=True, env=_env(), timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == NO_GPU, p.stderr[-2000:]
    assert not out.exists(), "mnist made a run folder before refusing the device"
    assert time.monotonic() - t < 60
    for cmd in (["finetune", "--epochs", "2"], ["bench", "--quick"]):
        out = tmp_path / cmd[0]
        with pytest.raises(SystemExit) as e:
            tp3([*cmd, "--device", "cuda", "--out", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.strip().splitlines()[-1] == NO_GPU, (cmd, err)
        assert not out.exists(), f"{cmd[0]} made a run folder before refusing the device"
