"""Text to HTML for the generated pages: escaped, with `code spans` kept as code.

The generated tables are raw HTML (Markdown tables would break on a `|` or a `*` in help text).
"""

from __future__ import annotations

import html
import re

CODE_SPAN = re.compile(r"`([^`]+)`")


def inline_html(text: str) -> str:
    parts = CODE_SPAN.split(text)
    return "".join(f"<code>{html.escape(part)}</code>" if i % 2 else html.escape(part)
                   for i, part in enumerate(parts))


def code(value: object) -> str:
    return f"<code>{html.escape(str(value))}</code>"
