"""Run folders -> one report, as Markdown and as a self-contained HTML page that opens in a browser."""
from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .core.runs import table_cell, markdown_table


@dataclass
class Section:
    """A report section: a title, paragraphs, tables (rows of dicts) and figures (paths relative to the report)."""
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[tuple[Sequence[Mapping[str, Any]], Sequence[str]]] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (relative path, caption)


def to_markdown(title: str, sections: Sequence[Section]) -> str:
    """The report as GitHub Markdown."""
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for p in s.paragraphs:
            out += [p, ""]
        for rows, cols in s.tables:
            out += [markdown_table(rows, cols), ""]
        for path, caption in s.figures:
            out += [f"![{caption}]({path})", "", f"*{caption}*", ""]
    return "\n".join(out)


def _inline(text: str) -> str:
    """Escape text for HTML, keeping Markdown `code` and **bold**."""
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)


def _td(value: Any) -> str:
    """A table cell: numbers right-aligned (the page's default), text left-aligned."""
    text = html.escape(table_cell(value))
    return f"<td>{text}</td>" if isinstance(value, (int, float)) else f'<td class="t">{text}</td>'


def to_html(title: str, sections: Sequence[Section]) -> str:
    """The report as one HTML page (figures referenced beside it, tables as real tables)."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    toc = "".join(f'<li><a href="#s{i}">{html.escape(s.title)}</a></li>' for i, s in enumerate(sections))
    body.append(f"<nav><ol>{toc}</ol></nav>")
    for i, s in enumerate(sections):
        body.append(f'<section id="s{i}"><h2>{html.escape(s.title)}</h2>')
        body += [f"<p>{_inline(p)}</p>" for p in s.paragraphs]
        for rows, cols in s.tables:
            cols = list(cols or (rows[0] if rows else []))
            head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
            trs = "".join("<tr>" + "".join(_td(r.get(c, "")) for c in cols) + "</tr>" for r in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
        for path, caption in s.figures:
            body.append(f'<figure><img src="{html.escape(path)}" alt="{html.escape(caption)}">'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        body.append("</section>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 10px;"
             "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child,td.t{text-align:left}"
             "img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:90%}"
             "code{background:#f5f5f5;padding:1px 4px}")
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def write_report(folder: str | Path, title: str, sections: Sequence[Section]) -> tuple[Path, Path]:
    """Write `report.md` and `report.html` into `folder`; figures must already lie under it."""
    folder = Path(folder)
    for s in sections:
        for path, _ in s.figures:
            if not (folder / path).is_file():
                raise FileNotFoundError(f"report figure {folder / path} is missing")
    md, page = folder / "report.md", folder / "report.html"
    md.write_text(to_markdown(title, sections))
    page.write_text(to_html(title, sections))
    return md, page
