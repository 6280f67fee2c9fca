"""`hybridserve tenants / ingest / search / delete / rerank` against the real platform."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

pytestmark = pytest.mark.integration


def _cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "hybridserve.cli", *args], capture_output=True, text=True, timeout=timeout
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
    assert out.returncode == 1 and "NOT_FOUND" in out.stderr and "tenants create" in out.stderr

    assert _cli("tenants", "create", tenant, *addr).returncode == 0
    out = _cli("ingest", str(docs), "--tenant", tenant, *addr)
    assert out.returncode == 0, out.stderr
    assert "4 documents: 4 chunks written" in out.stdout
    assert "skipped" in out.stderr and "empty.txt" in out.stderr
    assert "ingest -> " in out.stderr  # the progress bar

    again = _cli("ingest", str(docs), "--tenant", tenant, "--quiet", *addr)
    assert again.returncode == 0 and "0 chunks written" in again.stdout
    assert "4 documents unchanged" in again.stdout

    listing = _cli("tenants", "list", *addr)
    assert f"{tenant}\tchunks=4" in listing.stdout

    found = _cli("search", "when are you open", "--tenant", tenant, "--top-k", "1", "--json", *addr)
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
    assert _cli("tenants", "create", tenant, *addr).returncode == 0
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "text": "ok"}\n{"id": "b"\n')
    out = _cli("ingest", str(tmp_path), "--tenant", tenant, *addr)
    assert out.returncode == 1
    assert f"{tmp_path / 'bad.jsonl'}:2: malformed JSON" in out.stderr
    assert "nothing was ingested" in out.stderr
    assert f"{tenant}\tchunks=0" in _cli("tenants", "list", *addr).stdout


def test_rerank_cli(platform):
    out = _cli("rerank", "--address", platform.address, "watering tomatoes",
               "Interest rates rose.", "Water tomato plants deeply.")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].endswith("Water tomato plants deeply.")
