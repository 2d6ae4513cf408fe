"""mkdocs hook (`hooks:` in mkdocs.yml): fills the generated parts of the pages at build time.

Each generated part is a marker in a page: `<!-- cli-reference -->` in `cli.md` becomes the CLI
reference read from the argparse parser (`cli_reference.py`), `<!-- module-map -->` in
`architecture.md` the module-by-module map read from the source tree (`module_map.py`). A page
that lost its marker fails the build rather than silently showing nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import cli_reference  # this folder is on sys.path while mkdocs loads the hook
import module_map

GENERATED: dict[str, tuple[str, Callable[[], str]]] = {
    "cli.md": ("<!-- cli-reference -->", cli_reference.render_reference),
    "architecture.md": ("<!-- module-map -->", module_map.render_map),
}


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001 (mkdocs API)
    """mkdocs event: replace a page's marker with its generated text."""
    if page.file.src_uri not in GENERATED:
        return markdown
    marker, render = GENERATED[page.file.src_uri]
    if marker not in markdown:
        raise ValueError(f"docs/{page.file.src_uri} lost its marker {marker!r}")
    return markdown.replace(marker, render())
