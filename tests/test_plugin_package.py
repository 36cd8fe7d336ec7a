"""A plugin package works from a fresh virtual environment, set up exactly as
its author would set it up: the gateway installed from its source with the
``[test]`` extra (not editable), then the plugin package, which depends on
the gateway.  In that environment the package's own tests pass with its own
pytest (through :mod:`gateway.testing.pytest_plugin`), and its ``gateway
serve`` logs a user in through the plugin over real HTTP.

Both sources are copied to a temporary directory before ``pip install`` so
that no build output lands in this checkout.  One environment serves the
whole module.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.testing import Client, GatewayProcess, Upstream, assert_error

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_PKG = ROOT / "tests" / "plugins" / "gateway_example_provider"
SECRET = "example-shared-secret-for-tests"

# Neither source tree needs these to build, and build output must not be
# taken from (or left in) the checkout.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "var", "build", "dist", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".mypy_cache", ".ruff_cache")


def clean_env() -> dict[str, str]:
    """This environment, less what would let the new one see this one's packages."""
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTEST_ADDOPTS", "PYTEST_PLUGINS"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def run(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"{' '.join(map(str, argv))} exited with {proc.returncode}:\n" \
                                 f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def plugin_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment with the gateway (and its test extra) and
    the example provider package installed from copies of their sources;
    the copy of the package (with its tests) is ``<venv>/../example``."""
    base = tmp_path_factory.mktemp("plugin-package")
    gateway_src = base / "session-gateway"
    shutil.copytree(ROOT, gateway_src, ignore=_gateway_ignore)
    example_src = base / "example"
    shutil.copytree(EXAMPLE_PKG, example_src, ignore=NOT_SOURCE)

    venv = base / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", f"{gateway_src}[test]")
    run(python, "-m", "pip", "install", "--quiet", example_src)

    # The gateway the new environment imports is its own, not this checkout.
    where = run(python, "-c", "import gateway, gateway_example_provider as e; print(gateway.__file__, e.__file__)",
                cwd=base).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where
    return venv


def _gateway_ignore(directory: str, names: list[str]) -> set[str]:
    """What of the checkout is not the gateway's source: the above, and its tests."""
    ignored = set(NOT_SOURCE(directory, names))
    if Path(directory) == ROOT:
        ignored |= {"tests", "bench"} & set(names)
    return ignored


def test_the_package_tests_pass_with_its_own_pytest(plugin_venv: Path) -> None:
    tests = plugin_venv.parent / "example" / "tests"
    proc = run(plugin_venv / "bin" / "pytest", "-q", "-p", "no:cacheprovider", tests, cwd=plugin_venv.parent)
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ passed(, \d+ warnings?)? in .*", summary), proc.stdout


def ticket(subject: str) -> str:
    return subject + "." + hmac.new(SECRET.encode(), subject.encode(), hashlib.sha256).hexdigest()[:32]


@pytest.mark.gen_test(timeout=60)
async def test_its_gateway_serve_logs_in_through_the_plugin(plugin_venv: Path, upstream: Upstream,
                                                            tmp_path: Path) -> None:
    routes = [{"prefix": "/api/", "upstream": upstream.url, "auth": "required"}]
    served = GatewayProcess(tmp_path, routes, command=[str(plugin_venv / "bin" / "gateway")], env=clean_env(),
                            providers={"example": {"secret": SECRET}})
    async with served:
        async with Client(served.url) as client:
            login = await client.login_with("example", {"ticket": ticket("emp-1042")})
            r = await client.request("GET", "/api/orders", token=login["token"])
            assert r.code == 200, r.body
            assert upstream.last.header("X-User-Id") == login["user"]["id"]
            assert upstream.last.header("X-Auth-Provider") == "example"
            forged = await client.request("POST", "/auth/example/login", json_body={"ticket": "emp-1042.forged"})
            assert_error(forged, 401, "invalid_credentials")
        assert await served.stop() < 15
    assert served.proc is not None and served.proc.returncode == 0, served.output()
    assert "example" in served.output()
