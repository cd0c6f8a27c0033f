from pathlib import Path

from cleantune.reference import reference

DOC = Path(__file__).resolve().parents[1] / "docs" / "config-reference.md"


def test_the_config_reference_is_up_to_date():
    assert DOC.read_text() == reference(), "run: python -m cleantune.reference > docs/config-reference.md"


def test_the_reference_names_every_section_and_defense():
    text = reference()
    for section in ("`model`", "`data`", "`train`", "`defense` (RoRAConfig)", "`defense` (SignatureConfig)"):
        assert section in text
    assert "| `triggers` | list[str] | `['cf', 'mn', 'bb', 'tq']` |" in text  # a default from a factory
