"""`hybridserve admin tenants / ingest / search / delete / rerank` against the real platform."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

pytestmark = pytest.mark.integration


def _cli(*args, timeout=300, key=None):
    env = dict(os.environ)
    if key is not None:
        env["HYBRIDSERVE_API_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "hybridserve.cli", *args], capture_output=True, text=True,
        timeout=timeout, env=env,
    )


def test_ingest_folder_search_and_reingest(platform, tmp_path):
    addr = ("--address", platform.address)
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    docs = tmp_path / "docs"
    (docs / "guides").mkdir(parents=True)
    (docs / "guides" / "kettle.md").write_text("# Descaling the kettle\n\nUse citric acid monthly.")
    (docs / "notes.txt").write_text("The harbour crane lifts containers at night.")
    (docs / "page.html").write_text("<title>Opening hours</title><p>We open at nine.</p>")
    (docs / "faq.jsonl").write_text(
        json.dumps({"id": "faq-1", "text": "Refunds take five days.", "metadata": {"topic": "billing"}}) + "\n"
    )
    (docs / "empty.txt").write_text("")

    out = _cli("ingest", str(docs), "--tenant", tenant, *addr)
    assert out.returncode == 1 and "NOT_FOUND" in out.stderr and "admin tenants create" in out.stderr

    assert _cli("admin", "tenants", "create", tenant, *addr).returncode == 0
    made = _cli("admin", "keys", "create", tenant, "--name", "cli", *addr)
    assert made.returncode == 0 and "only time the key is shown" in made.stderr
    key = made.stdout.strip()
    # The tenant's own key needs no --tenant.
    out = _cli("ingest", str(docs), *addr, key=key)
    assert out.returncode == 0, out.stderr
    assert "4 documents: 4 chunks written" in out.stdout
    assert "skipped" in out.stderr and "empty.txt" in out.stderr
    assert "ingest -> " in out.stderr  # the progress bar

    again = _cli("ingest", str(docs), "--tenant", tenant, "--quiet", *addr)
    assert again.returncode == 0 and "0 chunks written" in again.stdout
    assert "4 documents unchanged" in again.stdout

    listing = _cli("admin", "tenants", "list", *addr)
    assert "  chunks: 4" in _block(listing.stdout, tenant)

    other = _cli("search", "when are you open", "--tenant", "someone-else", *addr, key=key)
    assert other.returncode == 1 and "PERMISSION_DENIED" in other.stderr
    found = _cli("search", "when are you open", "--top-k", "1", "--json", *addr, key=key)
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)
    assert hits[0]["docId"] == "page.html" and hits[0]["title"] == "Opening hours"

    filtered = _cli("search", "refunds", "--tenant", tenant, "--filter", "metadata.topic=billing",
                    "--rerank", *addr)
    assert filtered.returncode == 0 and "[faq-1#0]" in filtered.stdout and "rerank=" in filtered.stdout

    gone = _cli("delete", "faq-1", "guides/kettle.md", "--tenant", tenant, *addr)
    assert gone.returncode == 0 and "deleted 2 chunks" in gone.stdout


def test_malformed_input_ingests_nothing(platform, tmp_path):
    addr = ("--address", platform.address)
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    assert _cli("admin", "tenants", "create", tenant, *addr).returncode == 0
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "text": "ok"}\n{"id": "b"\n')
    out = _cli("ingest", str(tmp_path), "--tenant", tenant, *addr)
    assert out.returncode == 1
    assert f"{tmp_path / 'bad.jsonl'}:2: malformed JSON" in out.stderr
    assert "nothing was ingested" in out.stderr
    assert "  chunks: 0" in _block(_cli("admin", "tenants", "list", *addr).stdout, tenant)


def _block(listing: str, tenant: str) -> list[str]:
    """The lines `admin tenants list` prints for one tenant (its line, then the indented ones)."""
    lines = listing.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{tenant}\t"))
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        block.append(line)
    return block


def test_rerank_cli(platform):
    out = _cli("rerank", "--address", platform.address, "watering tomatoes",
               "Interest rates rose.", "Water tomato plants deeply.")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].endswith("Water tomato plants deeply.")
