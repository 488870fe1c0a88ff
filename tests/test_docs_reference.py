"""The site's reference pages match the code they are generated from (`make docs-reference`)."""

from __future__ import annotations

import pytest

from devtools import docs_reference


def test_every_generated_reference_page_matches_the_code() -> None:
    stale = docs_reference.stale_pages()
    assert stale == [], f"run `make docs-reference` and commit docs/reference/: {stale}"


def test_a_setting_missing_from_env_example_stops_the_generator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = docs_reference.ENV_EXAMPLE.read_text().replace("CONVEYOR_SIGNUP=", "CONVEYOR_SIGN_UP=")
    monkeypatch.setattr(docs_reference, "ENV_EXAMPLE", _Text(text))
    with pytest.raises(SystemExit, match="CONVEYOR_SIGNUP"):
        docs_reference.configuration_page()


def test_a_changed_default_makes_the_configuration_page_stale(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from conveyor.settings import Settings

    committed = (docs_reference.REFERENCE / "configuration.md").read_text()
    field = Settings.model_fields["job_retention_days"]
    monkeypatch.setattr(field, "default", 7.0)
    changed = docs_reference.configuration_page()
    assert changed != committed
    assert "| `CONVEYOR_JOB_RETENTION_DAYS` | number, > 0 | `7.0` |" in changed


def test_env_blocks_give_each_setting_the_comment_above_it() -> None:
    text = (
        "# intro\n# more\n\n# Two knobs.\nCONVEYOR_A=1\nCONVEYOR_B=2\n# One more.\n# CONVEYOR_C=\n"
    )
    blocks = docs_reference.env_blocks(text)
    assert [(b.comment, [n for n, _ in b.settings]) for b in blocks] == [
        (["Two knobs."], ["CONVEYOR_A", "CONVEYOR_B"]),
        (["One more."], ["CONVEYOR_C"]),
    ]


class _Text:
    """A stand-in for a Path whose text is given."""

    def __init__(self, text: str) -> None:
        self._text = text

    def read_text(self) -> str:
        return self._text
