"""The report as a list of blocks (headings, text, bullets, tables, figures), and those blocks rendered as markdown
(figures as PNG files beside it) and as one self-contained HTML file (figures embedded)."""

from __future__ import annotations

import base64
import html
import io
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from finetune_lab import plots

IMAGES = "report_images"
MAX_ERROR_CHARS = 120


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Text:
    text: str


@dataclass
class Bullets:
    """Verdict lines."""

    items: list[str]


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    caption: str
    name: str
    """What the figure is, for its file name (`loss_vs_rank-<sweep>`)."""
    data: bytes
    """PNG bytes."""


@dataclass
class Figures:
    """Figures shown side by side."""

    items: list[Figure]


Block = Heading | Text | Bullets | Table | Figures


def png(figure) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plots.plt.close(figure)
    return buffer.getvalue()


def number(value) -> str:
    """A metric as printed in the tables: integers as such, other numbers to 6 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (int, float)) and float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def cell(value) -> str:
    """A table cell: text as it is, numbers as `number` prints them."""
    return value if isinstance(value, str) else number(value)


def counted(n: int, noun: str) -> str:
    """`1 child run`, `2 child runs`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def short(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------- markdown
def _file_name(name: str, taken: set[str]) -> str:
    """`name` as a file name (safe characters only), numbered if another figure has it already."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:80] or "figure"
    candidate, n = f"{stem}.png", 1
    while candidate in taken:
        n += 1
        candidate = f"{stem}-{n}.png"
    taken.add(candidate)
    return candidate


def _md_escape(text: str) -> str:
    """Run names, replies and errors as text, never as HTML: markdown renderers pass raw HTML (a `<script>` in a run
    name) straight through."""
    return html.escape(text, quote=False)


def _md_inline(text: str) -> str:
    """Escape everything outside `code` spans (the only markdown the blocks' text uses; a span shows its content
    literally)."""
    parts = re.split(r"(`[^`]+`)", text)
    return "".join(part if part.startswith("`") and part.endswith("`") and len(part) > 1 else _md_escape(part)
                   for part in parts)


def _md_cell(text: str) -> str:
    return _md_escape(str(text)).replace("|", "\\|").replace("\n", " ")


def _md_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(map(_md_cell, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def to_markdown(blocks: list[Block], images: Path) -> str:
    """Markdown; figures are written as PNG files into `images` (referenced relative to its parent)."""
    parts, taken = [], set()
    for block in blocks:
        if isinstance(block, Heading):
            parts.append("#" * block.level + " " + _md_inline(block.text))
        elif isinstance(block, Text):
            parts.append(_md_inline(block.text))
        elif isinstance(block, Bullets):
            parts.append("\n".join(f"- **verdict** {_md_escape(item)}" for item in block.items))
        elif isinstance(block, Table):
            parts.append(_md_table(block.columns, block.rows))
        elif isinstance(block, Figures):
            links = []
            for figure in block.items:
                path = images / _file_name(figure.name, taken)
                path.write_bytes(figure.data)
                alt = figure.caption.replace("[", "\\[").replace("]", "\\]")  # the cell escapes the rest
                links.append(f"![{alt}]({images.name}/{path.name})")
            parts.append(_md_table([f.caption for f in block.items], [links]))  # a row of images: side by side
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------- html
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; white-space: nowrap; }
.wide { overflow-x: auto; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; } figure { margin: 0; max-width: 100%; }
img { max-width: 100%; height: auto; }
figcaption { font-size: 0.85em; text-align: center; } li.verdict { margin: 0.2em 0; }
"""


def _inline(text: str) -> str:
    """Escape, then render `code` spans (the only markdown the blocks' text uses)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def to_html(blocks: list[Block]) -> str:
    """One self-contained HTML file: the styles inline, the figures as base64 data URIs."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            parts.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Bullets):
            items = "".join(f'<li class="verdict"><b>verdict</b> {html.escape(i)}</li>' for i in block.items)
            parts.append(f"<ul>{items}</ul>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(c)}</th>" for c in block.columns)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                           for row in block.rows)
            parts.append(f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')
        elif isinstance(block, Figures):
            figures = "".join(
                f'<figure><img alt="{html.escape(f.caption)}" src="data:image/png;base64,'
                f'{base64.b64encode(f.data).decode()}"><figcaption>{html.escape(f.caption)}</figcaption></figure>'
                for f in block.items)
            parts.append(f'<div class="figures">{figures}</div>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>finetune-lab report</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write(blocks: list[Block], output: Path) -> tuple[Path, Path]:
    """report.md (+ its images folder, replaced) and report.html in `output`."""
    output.mkdir(parents=True, exist_ok=True)
    images = output / IMAGES
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir()
    markdown, page = output / "report.md", output / "report.html"
    markdown.write_text(to_markdown(blocks, images), encoding="utf-8")
    page.write_text(to_html(blocks), encoding="utf-8")
    return markdown, page
