"""The documentation holds together: the configuration reference is the
declared options, verbatim; every relative link leads somewhere; the README
is the front door to the rest."""

import re
from pathlib import Path

import pytest

from gateway.reference import render

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MARKDOWN = [README, *DOCS]

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.DOTALL)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def prose(text: str) -> str:
    """``text`` without fenced code blocks (headings and links there are
    not headings and links)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text in lower case,
    punctuation dropped, each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file; a repeated slug gets -1, -2..."""
    seen: dict[str, int] = {}
    out = set()
    for match in HEADING.finditer(prose(path.read_text())):
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    text = INLINE_CODE.sub("", prose(path.read_text()))
    return INLINE_LINK.findall(text) + REFERENCE_DEF.findall(text)


def test_slug_is_githubs():
    assert slug("Bodies, timeouts and limits") == "bodies-timeouts-and-limits"
    assert slug("[providers.wechat.apps.<name>]") == "providerswechatappsname"
    assert slug("[[routes]]") == "routes"
    assert slug("`gateway_providers(gateway)`") == "gateway_providersgateway"
    assert slug("Request-only providers: `gateway_authenticate`") == "request-only-providers-gateway_authenticate"


def test_configuration_reference_is_generated():
    assert (ROOT / "docs" / "configuration.md").read_text() == render(), (
        "docs/configuration.md is not what gateway.reference renders: run make docs"
    )


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    broken = []
    for target in links(path):
        if SCHEME.match(target):
            continue  # http:, https:, mailto:...
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"broken links in {path.relative_to(ROOT)}: {broken}"


def test_readme_names_the_two_setup_commands():
    text = README.read_text()
    assert "make run" in text and "make test" in text


@pytest.mark.parametrize("doc", ["docs/http.md", "docs/configuration.md", "docs/operations.md", "docs/plugins.md"])
def test_readme_links_the_reference(doc):
    targets = {t.partition("#")[0] for t in links(README)}
    assert doc in targets, f"README.md does not link {doc}"


def test_every_package_is_in_the_distribution():
    """setup.cfg lists packages one by one: a new subpackage must be added
    there, or a wheel (unlike the editable install) would leave it out."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "gateway").rglob("__init__.py")}
    assert on_disk <= listed, f"missing from setup.cfg: {sorted(on_disk - listed)}"
    assert "gateway_plugins" in listed
