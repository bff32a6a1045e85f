"""`tp3 bench --compare`: the ratio of two benchmark runs cell by cell, and the refusal of runs that differ."""
import copy
import json
import re

import numpy as np
import pytest

from tp3_fastai.bench.compare import compare_benches, read_bench
from tp3_fastai.cli import main as tp3
from figures import CYCLE, pixels, rgb

TINY = ["--quick", "--size", "32", "--bs", "2", "--steps", "1", "--repeats", "1", "--warmup", "1", "--modes", "frozen",
        "--precisions", "fp32,fp16", "--formats", "contiguous", "--no-pipeline", "--overhead-modes", "frozen",
        "--device", "cpu", "--threads", "1"]


def _exits_2(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        tp3(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny runs of the same configuration, the second one compared with the first through `tp3 bench`."""
    tmp = tmp_path_factory.mktemp("compare")
    tp3(["bench", *TINY, "--out", str(tmp / "a"), "--cache-dir", str(tmp / "cache")])
    tp3(["bench", *TINY, "--out", str(tmp / "b"), "--cache-dir", str(tmp / "cache"), "--compare",
         str(tmp / "a" / "bench.json")])
    return tmp, json.loads((tmp / "a" / "bench.json").read_text()), json.loads((tmp / "b" / "compare.json").read_text())


def _table(md: str) -> dict[tuple[str, str], tuple[float, float, float]]:
    """compare.md's table: (section, cell) -> (A images/s, B images/s, B / A)."""
    rows = re.findall(r"^\| ([a-z ]+) \| ([^|]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", md, re.M)
    return {(s, c): (float(a), float(b), float(r)) for s, c, a, b, r in rows}


def _bars(img: np.ndarray, colour: str) -> int:
    """Horizontal bars drawn in `colour`: the runs of that colour down the column just right of where they start."""
    mask = (np.abs(img - rgb(colour)).max(axis=-1) <= 6)
    cols = np.flatnonzero(mask.sum(axis=0) > 0)
    if not len(cols):
        return 0
    column = mask[:, cols.min() + 2].astype(int)
    return int((np.diff(np.concatenate([[0], column])) == 1).sum())


def test_compare_gives_the_ratio_of_every_cell_both_runs_measured(two_runs):
    tmp, first, saved = two_runs
    a = json.loads((tmp / "b" / "bench.json").read_text())   # the run just measured is A, the other one B
    b = json.loads((tmp / "a" / "bench.json").read_text())
    assert a["pipeline"] is None and b == first  # --no-pipeline: no pipeline section
    ips = lambda r: {(g["mode"], g["precision"]): g["images_per_s"] for g in r["grid"] if g["status"] == "ok"}  # noqa: E731
    grid = {tuple(r["key"][1:3]): r for r in saved["rows"] if r["section"] == "modes x levers"}
    assert set(grid) == set(ips(a)) == {("unfrozen", "fp32"), ("frozen", "fp32")}
    for key, row in grid.items():
        assert row["a_images_per_s"] == ips(a)[key] and row["b_images_per_s"] == ips(b)[key]
        assert row["ratio"] == pytest.approx(ips(b)[key] / ips(a)[key])
    loops = {r["key"][2]: r for r in saved["rows"] if r["section"] == "fastai vs plain loop"}
    assert set(loops) == {o["loop"] for o in a["overhead"]}
    for o_a, o_b in zip(a["overhead"], b["overhead"]):
        assert loops[o_a["loop"]]["ratio"] == pytest.approx(o_b["images_per_s"] / o_a["images_per_s"])
    assert saved["baseline_ratio"] == grid[("unfrozen", "fp32")]["ratio"]
    # fp16 needs CUDA: skipped by both runs, listed apart and not compared
    assert [s["cell"] for s in saved["skipped"]] == ["frozen, fp16, contiguous"]
    # compare.md: every cell both runs measured, with both throughputs and their ratio, read from the two runs'
    # bench.json (4 significant digits in the table, 3 for the baseline)
    md = (tmp / "b" / "compare.md").read_text()
    want = {("modes x levers", f"{m}, {p}, contiguous"): (ips(a)[m, p], ips(b)[m, p]) for m, p in ips(a)}
    want.update({("fastai vs plain loop", f"{x['mode']}, {x['loop']}, {x['precision']}"): (
        x["images_per_s"], y["images_per_s"]) for x, y in zip(a["overhead"], b["overhead"])})
    table = _table(md)
    assert set(table) == set(want) and len(want) == 6
    for key, (ips_a, ips_b) in want.items():
        assert table[key] == pytest.approx((ips_a, ips_b, ips_b / ips_a), rel=1e-3), key
    base = b["baseline"]["images_per_s"] / a["baseline"]["images_per_s"]
    assert f"Baseline (unfrozen, fp32, contiguous): B is **{base:.3g}x** A." in md
    assert "Not measured by both runs (skipped on their device): frozen, fp16, contiguous (A: skipped: needs CUDA, " \
           "B: skipped: needs CUDA)." in md
    # compare.png: a bar per compared cell, blue for the modes x levers cells, orange for the loops, no other
    img = pixels(tmp / "b" / "compare.png")
    assert (_bars(img, CYCLE[0]), _bars(img, CYCLE[1]), _bars(img, CYCLE[2])) == (2, 4, 0)


def test_two_earlier_runs_compare_without_measuring(two_runs, tmp_path):
    tmp, _, second = two_runs
    tp3(["bench", "--compare", f"{tmp / 'a'},{tmp / 'b' / 'bench.json'}", "--out", str(tmp_path / "c")])
    assert {p.name for p in (tmp_path / "c").iterdir()} == {"compare.json", "compare.md", "compare.png"}
    r = json.loads((tmp_path / "c" / "compare.json").read_text())
    # A and B swapped: every ratio is the inverse of the first comparison's
    inverse = {tuple(x["key"]): 1 / x["ratio"] for x in second["rows"]}
    assert {tuple(x["key"]): pytest.approx(x["ratio"]) for x in r["rows"]} == inverse


def test_runs_of_another_model_size_or_batch_are_refused_before_measuring(two_runs, tmp_path, capsys):
    tmp, _, _ = two_runs
    err = _exits_2(["bench", *TINY, "--bs", "4", "--compare", str(tmp / "a" / "bench.json"), "--out",
                    str(tmp_path / "d")], capsys)
    assert err.startswith("error: cannot compare benchmarks of different configurations (bs differ): this run is "
                          "resnet18, 32 px, batch 4") and err.endswith("--arch resnet18 --size 32 --bs 2")
    assert not (tmp_path / "d").exists()
    a = read_bench(tmp / "a")
    for field, value in (("arch", "resnet50"), ("size", 64)):
        with pytest.raises(ValueError, match=f"{field} differ"):
            compare_benches(a, dict(a, **{field: value}))
    with pytest.raises(FileNotFoundError, match="no benchmark at"):
        read_bench(tmp_path / "missing")
    (tmp_path / "x.json").write_text('{"grid": []}')
    with pytest.raises(ValueError, match="is not a bench_freeze result"):
        read_bench(tmp_path / "x.json")


def test_a_cpu_run_pairs_with_a_gpu_runs_cudnn_benchmark_off(two_runs):
    """A GPU run has each cell with cudnn.benchmark off and on; a CPU run has it n/a: n/a pairs with off."""
    tmp, _, _ = two_runs
    cpu = read_bench(tmp / "a")
    gpu = copy.deepcopy(cpu)
    gpu.update(device="cuda", device_name="a GPU")
    grid = []
    for g in cpu["grid"]:
        for on, factor in ((False, 10.0), (True, 20.0)):
            grid.append(dict(g, cudnn_benchmark=on, images_per_s=g["images_per_s"] * factor
                             if g["status"] == "ok" else None))
    gpu["grid"] = grid
    c = compare_benches(cpu, gpu)
    rows = [r for r in c["rows"] if r["section"] == "modes x levers"]
    assert len(rows) == 2 and all(r["ratio"] == pytest.approx(10.0) for r in rows)
    assert all(r["cudnn_note"] for r in rows) and c["baseline_ratio"] == pytest.approx(10.0)
    assert sorted(c["only_b"]) == ["frozen, fp16, contiguous, cudnn.benchmark on",
                                   "frozen, fp32, contiguous, cudnn.benchmark on",
                                   "unfrozen, fp32, contiguous, cudnn.benchmark on"]
