"""The documentation stays true: the configuration page is generated from the code and current,
the README stays an entry page, and every link between the pages leads somewhere."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md"]
PAGES += [*sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]


def test_the_configuration_page_is_current() -> None:
    spec = importlib.util.spec_from_loader(
        "gen_config_docs",
        importlib.machinery.SourceFileLoader(
            "gen_config_docs", str(ROOT / "scripts" / "gen_config_docs")
        ),
    )
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    expected = generator.render()
    assert (ROOT / "docs" / "configuration.md").read_text() == expected, (
        "docs/configuration.md is out of date: run .venv/bin/python scripts/gen_config_docs"
    )


def test_every_setting_is_on_the_configuration_page() -> None:
    from llm_service.flags import env_name
    from llm_service.settings import ClientSettings, GatewaySettings, ServiceSettings

    page = (ROOT / "docs" / "configuration.md").read_text()
    for settings in (ServiceSettings, ClientSettings, GatewaySettings):
        for name in settings.model_fields:
            assert f"`{env_name(name, settings)}`" in page


def test_the_readme_is_an_entry_page() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150
    text = "\n".join(lines)
    assert "./scripts/run" in text and "./scripts/test" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_lead_somewhere(page: Path) -> None:
    text = page.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"(https?:|mailto:)", target):
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            broken.append(target)
        elif anchor and where.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", where.read_text(), re.MULTILINE)
            slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
            if anchor not in slugs:
                broken.append(target)
    assert broken == []
