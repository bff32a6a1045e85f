"""The receptive-field table as Markdown and CSV."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

from .measure import RFMeasurement
from .trace import RFRow


def fmt_axes(vals: Sequence) -> str:
    """Per-axis values as '11x11' ('-' for an undefined value)."""
    return "x".join("-" if v is None else str(v) for v in vals) if vals else "-"


def fmt_start(vals: Sequence) -> str:
    """Per-axis starts as '(1.5, 1.5)'."""
    return "(" + ", ".join(str(v) for v in vals) + ")" if vals else "-"


def _fmt_R(r: RFRow) -> str:
    if r.whole and all(r.whole):
        return fmt_axes(r.R) + " (whole)"
    if any(r.whole):
        return fmt_axes(r.R) + f" (whole along axis {', '.join(str(a) for a, w in enumerate(r.whole) if w)})"
    return fmt_axes(r.R)


def rf_table_markdown(rows: Sequence[RFRow], measurements: Sequence[RFMeasurement] | None = None) -> str:
    """A Markdown table: layer, op, output shape, params, R, J, start (and the measured values when given)."""
    meas = {m.name: m for m in measurements or []}
    notes = any(r.note for r in rows)
    head = ["layer", "op", "output shape", "params", "R", "J", "start"]
    head += ["measured R", "measured J", "measured start", "agrees"] if meas else []
    head += ["note"] if notes else []
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        name = f"`{r.name}`" + (f" (end of {', '.join(f'`{e}`' for e in r.ends)})" if r.ends else "")
        cells = [name, r.op, "x".join(map(str, r.out_shape)), f"{r.params:,}", _fmt_R(r), fmt_axes(r.J),
                 fmt_start(r.start)]
        if meas:
            m = meas.get(r.name)
            cells += [fmt_axes(m.R), fmt_axes(m.J), fmt_start(m.start), "yes" if m.agrees else "**NO**"] \
                if m else ["", "", "", ""]
        if notes:
            cells.append(r.note)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_rf_table(rows: Sequence[RFRow], folder: str | Path,
                   measurements: Sequence[RFMeasurement] | None = None) -> dict[str, Path]:
    """Write `receptive_field.csv` (one column per axis) and `receptive_field.md` into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_ax = max((len(r.R) for r in rows), default=0)
    meas = {m.name: m for m in measurements or []}
    csv_path, md_path = folder / "receptive_field.csv", folder / "receptive_field.md"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        head = ["name", "op", "out_shape", "params"] + [f"{k}{a}" for k in ("R", "J", "start") for a in range(n_ax)]
        head += ["whole", "ends", "inputs", "note"] + (["measured_R", "measured_J", "agrees"] if meas else [])
        w.writerow(head)
        for r in rows:
            row = [r.name, r.op, "x".join(map(str, r.out_shape)), r.params]
            for vals in (r.R, r.J, r.start):
                row += ["" if v is None else v for v in vals] + [""] * (n_ax - len(vals))
            row += ["x".join("1" if b else "0" for b in r.whole), ";".join(r.ends), ";".join(r.inputs), r.note]
            if meas:
                m = meas.get(r.name)
                row += [fmt_axes(m.R), fmt_axes(m.J), m.agrees] if m else ["", "", ""]
            w.writerow(row)
    md_path.write_text(rf_table_markdown(rows, measurements))
    return {"csv": csv_path, "md": md_path}
