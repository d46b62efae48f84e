"""The report's single HTML page: figures embedded as base64 (the page works when copied alone) with a
link to each PNG beside it, and the summary table as an HTML table."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.5em 0; } img { max-width: 100%; } figcaption { color: #555; font-size: 0.9em; }
"""


@dataclass
class Figure:
    file: str  # PNG file name, relative to the page
    title: str
    caption: str
    png: bytes


def render_page(
    title: str,
    notes: Sequence[str],
    tables: Sequence[tuple[str, list[str], list[list[str]]]],
    figures: Sequence[Figure],
) -> str:
    """`tables`: (heading, header cells, rows of cells); cells that parse as numbers are right-aligned."""
    parts = [
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    parts += [f"<p>{html.escape(note)}</p>" for note in notes]
    for heading, header, rows in tables:
        parts.append(
            f"<h2>{html.escape(heading)}</h2><table><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in header)
            + "</tr>"
        )
        for row in rows:
            parts.append("<tr>" + "".join(_cell(c) for c in row) + "</tr>")
        parts.append("</table>")
    for figure in figures:
        data = base64.b64encode(figure.png).decode("ascii")
        parts.append(
            f"<figure id='{html.escape(figure.file)}'><h2>{html.escape(figure.title)}</h2>"
            f"<img src='data:image/png;base64,{data}' alt='{html.escape(figure.title)}'>"
            f"<figcaption>{html.escape(figure.caption)} (<a href='{html.escape(figure.file)}'>"
            f"{html.escape(figure.file)}</a>)</figcaption></figure>"
        )
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _cell(text: str) -> str:
    try:
        float(text.split(" ")[0])
        numeric = True
    except ValueError:
        numeric = False
    return f"<td class='num'>{html.escape(text)}</td>" if numeric else f"<td>{html.escape(text)}</td>"
