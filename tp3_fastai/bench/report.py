"""The training-modes benchmark's outputs: the Markdown report and the bar chart."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..train.modes import modes_for
from .depth import depth_markdown
from ..core.runs import pyplot, save_figure


def _ms(s: Mapping[str, float]) -> str:
    return f"{s['median']:.4g} [{s['min']:.4g}-{s['max']:.4g}]"


def cell_label(row: Mapping[str, Any]) -> str:
    parts = [row["mode"], row["precision"], "CL" if row["memory_format"] == "channels_last" else "contig"]
    if row.get("compile"):
        parts.append("compile")
    if row.get("cudnn_benchmark") is not None:
        parts.append(f"cudnn.bm={'on' if row['cudnn_benchmark'] else 'off'}")
    return " | ".join(parts)


def bench_markdown(result: Mapping[str, Any]) -> str:
    """The benchmark's Markdown report: header with device and versions, then one table per section."""
    cfg, env = result["config"], result["env"]
    dev_line = f"{result['device_name']} ({result['device']})"
    if env.get("cuda"):
        dev_line += (f", CUDA {env['cuda']}, cuDNN {env.get('cudnn')}, driver {env.get('driver') or '?'}, "
                     f"TF32 allowed {env.get('tf32')}")
    lines = [f"# Training modes: {result['arch']}, {result['size']} px, batch {result['bs']}", "",
             f"- command: `{cfg.get('command') or 'bench_training_modes(...)'}`",
             f"- device: {dev_line}; torch {env['torch']}, fastai {env['fastai']}, timm {env['timm']}, "
             f"{env.get('torch_threads')} torch threads",
             f"- load average (1/5/15 min) at start {cfg['load_average_start']}, at end "
             f"{result['load_average_end']}",
             f"- timing: {result['timing']}: warm-up {cfg['warmup']}, {cfg['steps']} steps x {cfg['repeats']} "
             "repeats; step ms shows median [min-max]",
             f"- peak memory: {result['memory_note'] or 'torch.cuda.max_memory_allocated per cell, MiB'}", "",
             "## Modes x speed levers (plain PyTorch loop, synthetic on-device batches)", "",
             f"Ratios are to the unfrozen fp32 contiguous baseline of this run "
             f"({result['baseline']['images_per_s']:.4g} images/s). Epoch and {result['epochs_estimate']}-epoch "
             f"estimates are for {result['epoch_images']:,} images; precomputed adds its one-off cache pass.", "",
             "| mode | precision | format | compile | cudnn.benchmark | images/s | step ms | peak MiB | x baseline "
             f"| cache pass s (one-off) | epoch s | {result['epochs_estimate']} epochs s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["grid"]:
        cudnn = "n/a" if r["cudnn_benchmark"] is None else ("on" if r["cudnn_benchmark"] else "off")
        head = f"| {r['mode']}{' (baseline)' if r.get('baseline') else ''} | {r['precision']} | " \
               f"{r['memory_format']} | {'on' if r['compile'] else 'off'} | {cudnn} | "
        if r["status"] != "ok":
            lines.append(head + f"{r['status']} | | | | | | | |")
            continue
        mem = "n/a" if r.get("peak_memory_mb") is None else f"{r['peak_memory_mb']:,.0f}"
        cache = f"{r['cache_s']:.4g} ({r['cache_images_per_s']:.4g} img/s)" if r["mode"] == "precomputed" else "-"
        lines.append(head + f"{r['images_per_s']:.4g} | {_ms(r['step_ms'])} | {mem} | "
                     f"{r['speedup_vs_baseline']:.3g} | {cache} | {r['epoch_s']:.4g} | {r['estimate_s']:.4g} |")
    lines += ["", "Modes: " + "; ".join(f"**{k}**: {v}" for k, v in result["mode_labels"].items()
                                        if any(r["mode"] == k for r in result["grid"])) + "."]
    if result["overhead"]:
        lines += ["", f"## fastai Learner vs plain PyTorch loop ({result['overhead'][0]['precision']}, "
                  "same model, initial weights, data and one-cycle schedule)", "",
                  "| mode | loop | step ms | images/s | x plain step time | overhead ms/step | host reads/step |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["overhead"]:
            reads = "-" if r["host_reads_per_step"] is None else f"{r['host_reads_per_step']:g}"
            lines.append(f"| {r['mode']} | {r['loop']}{'' if r['same_optimizer'] else ' (other optimiser)'} | "
                         f"{_ms(r['step_ms'])} | {r['images_per_s']:.4g} | {r['ratio_vs_plain']:.3f} | "
                         f"{r['overhead_ms_per_step']:+.3g} | {reads} |")
        lines += ["", "Loops: " + "; ".join(f"**{k}**: {v}" for k, v in result["loop_labels"].items()) + ". "
                  "Host reads (item/cpu/tolist/float/bool on tensors) are counted on whatever device ran; on CUDA "
                  "each is a synchronisation."]
    if result["pipeline"]:
        lines += pipeline_markdown(result["pipeline"])
    if result.get("depth"):
        lines += ["", f"## Freeze depth: what each mode costs ({result['depth'][0]['precision']}, plain loop, "
                  "modes in alternating rounds)", "",
                  "Step ms: median [min-max] over rounds; x: the step time over the first mode's, paired by round; "
                  "saved for backward: the activations autograd keeps for the backward pass in one training forward "
                  "(torch.autograd.graph.saved_tensors_hooks, each storage once, weights not counted); a gradual mode: "
                  f"the mean over the states of its first {result['epochs_estimate']} epochs.", ""]
        lines += depth_markdown(result["depth"], result["device_name"])
    return "\n".join(lines) + "\n"


def _opt(v, fmt: str = ".3g") -> str:
    return "-" if v is None else format(v, fmt)


def pipeline_markdown(p: Mapping[str, Any]) -> list[str]:
    """The input-pipeline section: the synthetic baseline, then each pipeline's block (its loader alone, then each
    loop on its batches), with host reads and blocking copies per training step."""
    from ..data.pipeline import PIPELINE_LABELS

    lines = ["", f"## Input pipelines: real images vs synthetic on-device batches ({p['data']})", "",
             f"Augmentation '{p.get('aug') or 'default'}'; {p.get('memory_format', 'contiguous')}; {p['note']}. "
             "Loader alone: training batches drawn with no model (reading, decoding, crops, augmentation, "
             "Normalize). Step ms: median [min-max] of the timed groups.", "",
             "| pipeline | mode | loop | images/s | step ms | max/min | of synthetic | host reads/step "
             "| blocking copies/step | workers, prefetch, warm-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in p["rows"]:
        setup = "-"
        if r["loop"] == "loader alone":
            setup = f"{r['workers']}, {r['prefetch']}, {r['warmup_batches']}"
        lines.append(f"| {r.get('pipeline') or 'synthetic'} | {r.get('mode') or '-'} | {r['loop']} | "
                     f"{r['images_per_s']:.4g} | {_ms(r['step_ms'])} | {_opt(r.get('max_over_min'))} | "
                     f"{_opt(r.get('of_synthetic'), '.0%')} | {_opt(r.get('reads_per_step'), 'g')} | "
                     f"{_opt(r.get('blocking_copies_per_step'), 'g')} | {setup} |")
    loaders = p.get("loaders") or []
    if loaders:
        first = loaders[0]["pipeline"]
        lines += ["", f"Loader alone: x {first}, cache fill (the cached pipeline's one-off decode) and augmentation:",
                  ""]
        for r in loaders:
            name = r["pipeline"] + (f" (ran {r['ran']})" if r.get("ran") and r["ran"] != r["pipeline"] else "")
            fill = (f"; cache fill {r['fill_s']:.3g} s, cached / streamed {r['cached']} / {r['streamed']}"
                    if r.get("fill_s") is not None else "")
            lines.append(f"- **{name}**: x{r.get('ratio_vs_first', 1):.2f} of {first}{fill}; "
                         f"augmentation: {r.get('augmentation') or '-'}")
        lines += ["", "Pipelines: " + "; ".join(f"**{k}**: {v}" for k, v in PIPELINE_LABELS.items()
                                              if any(r.get("ran", r["pipeline"]) == k for r in loaders)) + "."]
    return lines


def plot_bench(result: Mapping[str, Any], path: str | Path) -> Path:
    """Bar chart: training throughput per mode and lever (log scale), and the loop / pipeline comparison."""
    plt = pyplot()

    ok = [r for r in result["grid"] if r["status"] == "ok"]
    extra = [(f"{r['mode']} | {r['loop']}", r["images_per_s"]) for r in result["overhead"]]
    if result["pipeline"]:
        extra += [(f"{r.get('mode') or ''} | {r['loop']} | {r.get('pipeline') or r['data']}", r["images_per_s"])
                  for r in result["pipeline"]["rows"]]
    n_panels = 2 if extra else 1
    height = max(3.0, 0.32 * max(len(ok), len(extra)) + 1.5)
    fig, axes = plt.subplots(1, n_panels, figsize=(7.5 * n_panels, height), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    mode_colour = {m: colours[i % len(colours)] for i, m in enumerate(dict.fromkeys(
        [*modes_for("bench"), *(r["mode"] for r in ok)]))}
    ax = axes[0][0]
    labels = [cell_label(r) for r in ok]
    values = [r["images_per_s"] for r in ok]
    ax.barh(range(len(ok)), values, color=[mode_colour[r["mode"]] for r in ok])
    ax.set_yticks(range(len(ok)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("training images/s (log scale)")
    skipped = sorted({r["status"] for r in result["grid"] if r["status"] != "ok"})
    n_skipped = sum(r["status"] != "ok" for r in result["grid"])
    ax.set_title(f"{result['arch']}, {result['size']} px, batch {result['bs']} on {result['device_name']}"
                 + (f"\nnot shown: {n_skipped} cells ({'; '.join(skipped)})" if n_skipped else ""), fontsize=9)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
    ax.grid(axis="x", alpha=0.3)
    if extra:
        ax = axes[0][1]
        ax.barh(range(len(extra)), [v for _, v in extra], color="0.55")
        ax.set_yticks(range(len(extra)), [k for k, _ in extra], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("images/s (log scale)")
        ax.set_title("loops (fastai vs plain) and input pipeline", fontsize=9)
        for i, (_, v) in enumerate(extra):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
        ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path, dpi=110)
