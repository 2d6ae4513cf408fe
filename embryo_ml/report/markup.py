"""HTML building blocks the report's sections share: escaping and fact lists.

Every value from the scores file or the bundle goes through `escape`, in text and in quoted
attributes alike (see `embryo_ml.report.html`, "Safety").
"""

from __future__ import annotations

import html


def escape(value: object) -> str:
    """Escape for HTML text and quoted attribute values alike."""
    return html.escape("" if value is None else str(value), quote=True)


def facts(items: list[tuple[str, object]]) -> str:
    """A definition list of (name, value) facts, both escaped."""
    body = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in items)
    return f'<dl class="facts">{body}</dl>'
