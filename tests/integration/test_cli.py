"""The `hybridserve` command against the session's real platform."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import MAIN_APP

pytestmark = pytest.mark.integration


def _cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "hybridserve.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_generate_streams_and_reports_usage(platform):
    # One app would need no header; the CLI's client sends `application=generation`.
    assert MAIN_APP == "generation"
    out = _cli("generate", "--address", platform.address, "--max-tokens", "6", "--temperature", "0",
               "--adapter", platform.ids["alpha"], "the quick brown fox")
    assert out.returncode == 0, out.stderr
    assert "completion_tokens=6" in out.stderr and f"adapter={platform.ids['alpha']}" in out.stderr


def test_errors_say_what_to_do_next(platform):
    unknown = _cli("generate", "--address", platform.address, "--adapter", "ghost@v1", "hi")
    assert unknown.returncode == 1
    assert "NOT_FOUND" in unknown.stderr and "hybridserve adapters list" in unknown.stderr

    down = _cli("generate", "--address", "127.0.0.1:1", "--timeout", "5", "hi")
    assert down.returncode == 1
    assert "start it with `hybridserve up`" in down.stderr


def test_no_key_says_where_the_key_comes_from(platform, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HYBRIDSERVE_API_KEY"}
    env["HYBRIDSERVE_DATA_DIR"] = str(tmp_path)  # no admin.key there
    out = subprocess.run(
        [sys.executable, "-m", "hybridserve.cli", "adapters", "list", "--address", platform.address],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert out.returncode == 1
    assert "UNAUTHENTICATED" in out.stderr and "HYBRIDSERVE_API_KEY" in out.stderr
    # The local admin key file is what the CLI falls back to.
    key_file = tmp_path / "admin.key"
    key_file.write_text(platform.admin_key + "\n")
    out = subprocess.run(
        [sys.executable, "-m", "hybridserve.cli", "admin", "whoami", "--address", platform.address],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("admin key ")


def test_adapters_list(platform):
    out = _cli("adapters", "list", "--address", platform.address)
    assert out.returncode == 0, out.stderr
    for adapter_id in platform.ids.values():
        assert adapter_id in out.stdout
