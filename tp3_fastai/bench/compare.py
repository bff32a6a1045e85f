"""Two runs of the training-modes benchmark side by side (`bench_freeze.py --compare OTHER/bench.json`): the
ratio of their throughputs cell by cell, e.g. a GPU run against a CPU run, or after a change against before. Only
runs of the same model, image size and batch are compared."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..core.runs import markdown_table, new_run_dir, pyplot, read_json, save_figure, write_json
SAME = ("arch", "size", "bs")   # what must match for a ratio to mean anything


def read_bench(path: str | Path) -> dict[str, Any]:
    """The bench.json of a `bench_freeze` run (the file or its run folder), checked to be one."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "bench.json"
    if not path.is_file():
        raise FileNotFoundError(f"no benchmark at {path}: pass the bench.json of a bench_freeze run (or its folder)")
    try:
        result = read_json(path)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    missing = [k for k in (*SAME, "grid", "device_name") if not isinstance(result, dict) or k not in result]
    if missing:
        raise ValueError(f"{path} is not a bench_freeze result (no {', '.join(missing)})")
    return dict(result, source_path=str(path))


def _describe(r: Mapping[str, Any]) -> str:
    return f"{r['arch']}, {r['size']} px, batch {r['bs']}"


def check_comparable(a: Mapping[str, Any], b: Mapping[str, Any], a_name: str = "A", b_name: str = "B") -> None:
    """Refuse two runs (or a configuration and a run) of different model, image size or batch."""
    diff = [k for k in SAME if a[k] != b[k]]
    if diff:
        raise ValueError(f"cannot compare benchmarks of different configurations ({', '.join(diff)} differ): "
                         f"{a_name} is {_describe(a)}, {b_name} is {_describe(b)}. Run the same configuration: "
                         f"--arch {b['arch']} --size {b['size']} --bs {b['bs']}")


def _label(*parts: Any) -> str:
    return ", ".join(str(p) for p in parts if p)


def _cells(result: Mapping[str, Any]) -> dict[tuple, dict[str, Any]]:
    """Every measured cell of a run by key: the modes x levers grid, the loop comparison, the input pipeline.
    cudnn.benchmark 'n/a' (a CPU run) is keyed as 'off', PyTorch's default, so that it pairs with a GPU's 'off'."""
    cells = {}
    for r in result["grid"]:
        key = ("grid", r["mode"], r["precision"], r["memory_format"], bool(r["compile"]),
               bool(r["cudnn_benchmark"]))
        cell = _label(r["mode"], r["precision"], r["memory_format"], "compile" if key[4] else "",
                      "cudnn.benchmark on" if key[5] else "")
        cells[key] = dict(section="modes x levers", cell=cell,
                          status=r["status"], images_per_s=r.get("images_per_s"), device_cudnn=r["cudnn_benchmark"])
    for r in result.get("overhead") or []:
        key = ("loop", r["mode"], r["loop"], r["precision"])
        cells[key] = dict(section="fastai vs plain loop", cell=_label(r["mode"], r["loop"], r["precision"]),
                          status="ok", images_per_s=r["images_per_s"])
    for r in (result.get("pipeline") or {}).get("rows", []):
        key = ("pipeline", r.get("pipeline"), r["mode"], r["loop"], r["data"], r["precision"])
        cells[key] = dict(section="input pipeline", cell=_label(r.get("pipeline"), r["mode"], r["loop"], r["data"],
                                                                r["precision"]),
                          status="ok", images_per_s=r["images_per_s"])
    return cells


def _meta(r: Mapping[str, Any]) -> dict[str, Any]:
    env = r.get("env") or {}
    cfg = r.get("config") or {}
    return dict(path=r.get("source_path") or str(Path(r.get("run_dir", "")) / "bench.json"),
                device=r.get("device"), device_name=r["device_name"], torch=env.get("torch"),
                torch_threads=env.get("torch_threads"), command=cfg.get("command"),
                load_average_start=cfg.get("load_average_start"), steps=cfg.get("steps"), repeats=cfg.get("repeats"))


def compare_benches(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Cell by cell, B's images/s over A's (> 1: B is faster) for every cell both runs measured; the cells that
    only one run has, or that one run skipped, are listed apart."""
    check_comparable(a, b)
    ca, cb = _cells(a), _cells(b)
    rows, skipped = [], []
    for key, x in ca.items():
        y = cb.get(key)
        if y is None:
            continue
        if x["status"] != "ok" or y["status"] != "ok":
            skipped.append(dict(section=x["section"], cell=x["cell"], a=x["status"], b=y["status"]))
            continue
        rows.append(dict(key=list(key), section=x["section"], cell=x["cell"], a_images_per_s=x["images_per_s"],
                         b_images_per_s=y["images_per_s"], ratio=y["images_per_s"] / x["images_per_s"],
                         cudnn_note="n/a in one run, paired with 'off'"
                         if key[0] == "grid" and (x["device_cudnn"] is None) != (y["device_cudnn"] is None) else ""))
    only_a = [ca[k]["cell"] for k in ca if k not in cb]
    only_b = [cb[k]["cell"] for k in cb if k not in ca]
    grid = [r["ratio"] for r in rows if r["section"] == "modes x levers"]
    base = next((r for r in rows if r["key"] == ["grid", "unfrozen", "fp32", "contiguous", False, False]), None)
    return dict(config={k: a[k] for k in SAME}, a=_meta(a), b=_meta(b), rows=rows, skipped=skipped, only_a=only_a,
                only_b=only_b, baseline_ratio=base["ratio"] if base else None,
                grid_ratio=dict(min=min(grid), median=statistics.median(grid), max=max(grid)) if grid else None)


def compare_markdown(c: Mapping[str, Any]) -> str:
    """The comparison as Markdown: both runs, then one row per cell with both throughputs and the ratio."""
    a, b = c["a"], c["b"]
    lines = [f"# Benchmark comparison: {_describe(c['config'])}", "",
             f"- A: {a['device_name']} ({a['device']}), torch {a['torch']}, {a['torch_threads']} threads, "
             f"{a['steps']} steps x {a['repeats']} repeats, load {a['load_average_start']}: `{a['path']}`",
             f"- B: {b['device_name']} ({b['device']}), torch {b['torch']}, {b['torch_threads']} threads, "
             f"{b['steps']} steps x {b['repeats']} repeats, load {b['load_average_start']}: `{b['path']}`",
             "- ratio = B images/s / A images/s (> 1: B is faster), for the cells both runs measured", ""]
    if c["baseline_ratio"] is not None:
        lines += [f"Baseline (unfrozen, fp32, contiguous): B is **{c['baseline_ratio']:.3g}x** A.", ""]
    if c["grid_ratio"]:
        g = c["grid_ratio"]
        lines += [f"Modes x levers: ratio from {g['min']:.3g} to {g['max']:.3g} (median {g['median']:.3g}) over "
                  f"{sum(r['section'] == 'modes x levers' for r in c['rows'])} cells.", ""]
    rows = [dict(section=r["section"], cell=r["cell"] + (f" ({r['cudnn_note']})" if r["cudnn_note"] else ""),
                 **{"A images/s": r["a_images_per_s"], "B images/s": r["b_images_per_s"],
                    "B / A": r["ratio"]}) for r in c["rows"]]
    lines.append(markdown_table(rows) if rows else "No cell was measured by both runs.")
    if c["skipped"]:
        lines += ["", "Not measured by both runs (skipped on their device): " + "; ".join(
            f"{s['cell']} (A: {s['a']}, B: {s['b']})" for s in c["skipped"]) + "."]
    for side, cells in (("A", c["only_a"]), ("B", c["only_b"])):
        if cells:
            lines += ["", f"Only in {side}: " + "; ".join(cells) + "."]
    return "\n".join(lines) + "\n"


def plot_compare(c: Mapping[str, Any], path: str | Path) -> Path:
    """One bar per compared cell: B's images/s over A's, log scale, with 1 (no change) marked."""
    plt = pyplot()
    rows = c["rows"]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.3 * len(rows) + 1.4)))
    colours = {"modes x levers": "tab:blue", "fastai vs plain loop": "tab:orange", "input pipeline": "tab:green"}
    if rows:
        ratios = [r["ratio"] for r in rows]
        ax.barh(range(len(rows)), ratios, color=[colours[r["section"]] for r in rows])
        ax.set_yticks(range(len(rows)), [r["cell"] for r in rows], fontsize=7)
        for i, v in enumerate(ratios):
            ax.text(v, i, f" {v:.3g}x", va="center", fontsize=7)
        ax.set_xscale("log")
        ax.invert_yaxis()
    ax.axvline(1, color="0.3", lw=1)
    ax.set_xlabel("B images/s / A images/s (log scale; > 1: B faster)")
    ax.set_title(f"{_describe(c['config'])}: B = {c['b']['device_name']} vs A = {c['a']['device_name']}\n"
                 "blue: modes x levers, orange: loops, green: input pipeline", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def write_compare(c: Mapping[str, Any], folder: str | Path) -> dict[str, str]:
    """compare.json, compare.md and compare.png in `folder`."""
    folder = Path(folder)
    md = folder / "compare.md"
    write_json(folder / "compare.json", c)
    md.write_text(compare_markdown(c))
    return dict(json=str(folder / "compare.json"), md=str(md), png=str(plot_compare(c, folder / "compare.png")))


def bench_and_compare(compare: str | Sequence[str], config: Any = None, log: Callable[[str], None] | None = print,
                      **options: Any) -> dict[str, Any]:
    """`compare='OTHER/bench.json'`: check that OTHER has this run's model, size and batch (before measuring), run
    the benchmark (`config`: a freeze.BenchConfig, or its fields as keywords in `options`), then compare it (A)
    with OTHER (B) in its run folder. `compare='A/bench.json,B/bench.json'`: compare two earlier runs without
    measuring; the comparison goes to a new run folder (the configuration's `out`)."""
    from ..core.config import build_config
    from .freeze import BenchConfig, bench_training_modes, resolve_config

    cfg = build_config(BenchConfig, config, options)
    paths = [p.strip() for p in compare.split(",")] if isinstance(compare, str) else list(compare)
    paths = [p for p in paths if p]
    if len(paths) not in (1, 2):
        raise ValueError(f"--compare takes OTHER/bench.json or A/bench.json,B/bench.json, got {compare!r}")
    if len(paths) == 2:
        a, b = read_bench(paths[0]), read_bench(paths[1])
        check_comparable(a, b, paths[0], paths[1])
        folder = new_run_dir(cfg.out, cfg.overwrite)
        measured = None
    else:
        b = read_bench(paths[0])
        check_comparable(resolve_config(cfg.quick, arch=cfg.arch, size=cfg.size, bs=cfg.bs), b, "this run", paths[0])
        measured = bench_training_modes(cfg, log=log)
        a, folder = measured, Path(measured["run_dir"])
    result = compare_benches(a, b)
    result["files"] = write_compare(result, folder)
    if log:
        log("\n" + compare_markdown(result) + f"\ncomparison: {result['files']['md']}")
    return dict(result, bench=measured) if measured is not None else result
