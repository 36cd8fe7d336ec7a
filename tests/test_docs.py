"""The README's configuration reference is the declared options, verbatim."""

import pytest

from conftest import ROOT
from gateway.config import describe_options, reference_table
from gateway_plugins.apikey import ApiKeyProvider
from gateway_plugins.password import PasswordProvider
from gateway_plugins.wechat import APP_OPTIONS, WeChatProvider

README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("table", sorted(describe_options()))
def test_readme_documents_every_core_option(table):
    assert f"### {table}\n\n{describe_options()[table]}\n" in README


@pytest.mark.parametrize("table, options", [
    ("[providers.password]", PasswordProvider.options),
    ("[providers.wechat]", WeChatProvider.options),
    ("[providers.wechat.apps.<name>]", APP_OPTIONS),
    ("[providers.apikey]", ApiKeyProvider.options),
])
def test_readme_documents_every_builtin_provider_option(table, options):
    assert f"### {table}\n\n{reference_table(options)}\n" in README


def test_readme_names_the_two_setup_commands():
    assert "make run" in README and "make test" in README


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
