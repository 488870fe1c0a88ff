"""The documentation site builds with --strict and needs nothing from outside itself."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# An asset the browser would fetch from elsewhere: a script, a stylesheet, a font, an image.
EXTERNAL_ASSET = re.compile(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=\"(?:https?:)?//")


def test_the_site_builds_strict_and_offline(tmp_path: Path) -> None:
    site = tmp_path / "site"
    mkdocs = Path(sys.executable).parent / "mkdocs"
    built = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    pages = list(site.rglob("*.html"))
    assert len(pages) > 30
    for page in pages:
        html = page.read_text()
        assert not EXTERNAL_ASSET.search(html), page
        # Material would fetch mermaid.js from a CDN for a diagram: draw diagrams as text.
        assert 'class="mermaid"' not in html, page
    css = "".join(p.read_text() for p in site.rglob("*.css"))
    assert "@import" not in css
    assert "fonts.googleapis" not in css


def test_every_page_is_in_the_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert pages == set(re.findall(r":\s+([\w/.-]+\.md)$", nav, re.MULTILINE))
