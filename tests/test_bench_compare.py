"""`bench_freeze.py --compare`: the ratio of two benchmark runs cell by cell, and the refusal of runs that differ."""
import copy
import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

from tp3_fastai.bench.compare import compare_benches, compare_markdown, read_bench

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(quick=True, size=32, bs=2, steps=1, repeats=1, warmup=1, modes="frozen", precisions="fp32,fp16",
            formats="contiguous", no_pipeline=True, overhead_modes="frozen", device="cpu", threads=1)


def _bench_freeze():
    spec = importlib.util.spec_from_file_location("bench_freeze_script", ROOT / "scripts" / "bench_freeze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.bench_freeze


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny runs of the same configuration, the second one compared with the first through the script."""
    tmp = tmp_path_factory.mktemp("compare")
    bench_freeze = _bench_freeze()
    first = bench_freeze(out=str(tmp / "a"), cache_dir=str(tmp / "cache"), **TINY)
    second = bench_freeze(out=str(tmp / "b"), cache_dir=str(tmp / "cache"), compare=str(tmp / "a" / "bench.json"),
                          **TINY)
    return tmp, first, second


def test_compare_gives_the_ratio_of_every_cell_both_runs_measured(two_runs):
    tmp, first, second = two_runs
    a = json.loads((tmp / "b" / "bench.json").read_text())   # the run just measured is A, the other one B
    b = json.loads((tmp / "a" / "bench.json").read_text())
    saved = json.loads((tmp / "b" / "compare.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(second["rows"]))
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
    md = (tmp / "b" / "compare.md").read_text()
    assert md == compare_markdown(saved) and f"{grid[('frozen', 'fp32')]['ratio']:.4g}" in md
    assert "Not measured by both runs" in md and md.count("\n| modes x levers |") == 2
    with Image.open(tmp / "b" / "compare.png") as im:
        assert im.size[0] > 400


def test_two_earlier_runs_compare_without_measuring(two_runs, tmp_path):
    tmp, _, second = two_runs
    r = _bench_freeze()(compare=f"{tmp / 'a'},{tmp / 'b' / 'bench.json'}", out=str(tmp_path / "c"))
    assert {p.name for p in (tmp_path / "c").iterdir()} == {"compare.json", "compare.md", "compare.png"}
    # A and B swapped: every ratio is the inverse of the first comparison's
    inverse = {tuple(x["key"]): 1 / x["ratio"] for x in second["rows"]}
    assert {tuple(x["key"]): pytest.approx(x["ratio"]) for x in r["rows"]} == inverse


def test_runs_of_another_model_size_or_batch_are_refused_before_measuring(two_runs, tmp_path, capsys):
    tmp, _, _ = two_runs
    with pytest.raises(SystemExit) as e:
        _bench_freeze()(**dict(TINY, bs=4), compare=str(tmp / "a" / "bench.json"), out=str(tmp_path / "d"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
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
