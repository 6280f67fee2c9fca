"""`hybridserve admin`: the control plane from the shell (AdminService over gRPC).

  hybridserve admin whoami
  hybridserve admin tenants create ID [--display-name N] [--allow-base] [--system-prompt P]
  hybridserve admin tenants list | get ID | update ID ... | delete ID --yes
  hybridserve admin keys create TENANT --name N [--ttl-days D] | create --admin --name N
  hybridserve admin keys list [TENANT] [--all] | revoke KEY_ID
  hybridserve admin grants add TENANT ADAPTER [--default] | revoke TENANT ADAPTER
  hybridserve admin quotas set TENANT [--rpm N] [--tpm N] [--concurrency N]
  hybridserve admin apply -f tenants.yaml [--dry-run]
  hybridserve admin audit [--limit N] [--tenant T]
  hybridserve admin audit --export FILE.jsonl [--tenant T]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from hybridserve.cli.client_cmds import client_args, make_client
from hybridserve.exceptions import RateLimitError
from hybridserve.tenancy import keys


def _print_tenant(t) -> None:
    q = t.quotas
    quotas = ", ".join(
        f"{name}={value}" for name, value in (
            ("rpm", q.requests_per_minute), ("tpm", q.tokens_per_minute),
            ("concurrency", q.concurrent_streams)) if value
    ) or "none"
    print(f"{t.id}\t{t.display_name or '-'}")
    print(f"  adapters: {', '.join(t.adapters) or '(none)'}; default: {t.default_adapter or '-'}; "
          f"base model: {'allowed' if t.allow_base else 'not allowed'}")
    print(f"  quotas: {quotas}")
    if t.system_prompt:
        print(f"  system prompt: {t.system_prompt[:100]}{'...' if len(t.system_prompt) > 100 else ''}")


def cmd_admin(ns) -> int:
    if ns.admin_cmd == "generate-key":
        # Offline: a key for a Kubernetes Secret (the platform registers its digest at
        # start). Printed to stdout only, for `kubectl create secret ... --from-file`.
        print(keys.generate("admin").key)
        return 0
    with make_client(ns) as c:
        what, action = ns.admin_cmd, getattr(ns, "admin_action", None)
        if what == "whoami":
            me = c.whoami()
            print(f"{me.kind} key {me.key_id} ({me.key_name or 'unnamed'})"
                  + (f" of tenant {me.tenant.id}" if me.tenant.id else ""))
        elif what == "tenants":
            _tenants(c, ns, action)
        elif what == "keys":
            _keys(c, ns, action)
        elif what == "grants":
            if action == "add":
                _print_tenant(c.grant_adapter(ns.tenant, ns.adapter, make_default=ns.default))
            else:
                _print_tenant(c.revoke_adapter(ns.tenant, ns.adapter))
        elif what == "quotas":
            _print_tenant(c.set_quotas(ns.tenant, requests_per_minute=ns.rpm,
                                       tokens_per_minute=ns.tpm, concurrent_streams=ns.concurrency))
        elif what == "apply":
            document = sys.stdin.read() if ns.file == "-" else Path(ns.file).read_text()
            reply = c.apply(document, dry_run=ns.dry_run, keep_grants=ns.keep_grants)
            verb = "would change" if ns.dry_run else "changed"
            if not reply.changes:
                print("nothing to change: the platform already matches the file")
            for ch in reply.changes:
                print(f"{ch.action:8} {ch.tenant:20} {ch.detail}")
            if reply.changes:
                print(f"{verb} {len(reply.changes)} thing(s)" + (" (dry run: nothing was changed)"
                                                                 if ns.dry_run else ""))
        elif what == "audit":
            if ns.export:
                _export_audit(c, Path(ns.export), ns.tenant)
                return 0
            for e in c.audit(limit=ns.limit, tenant=ns.tenant):
                print(f"{e.at}  {e.actor:22} {e.action:18} {e.target:28} {e.outcome:18} {e.detail}")
    return 0


#: Entries per ListAudit call of an export (the server's largest page).
EXPORT_PAGE = 500


def _export_audit(c, path: Path, tenant: str = "") -> None:
    """Appends the audit entries the file does not have yet, oldest first, one JSON
    object per line. It resumes after the last id in the file, so running it on a
    schedule (more often than tenancy.audit_retention_days) keeps every entry."""
    last = 0
    if path.exists():
        with path.open("rb") as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        if lines:
            try:
                last = int(json.loads(lines[-1])["id"])
            except (ValueError, KeyError, TypeError):
                raise SystemExit(f"{path}: the last line is not an exported audit entry; "
                                 "export to a new file") from None
    written = 0
    with path.open("a", encoding="utf-8") as out:
        while True:
            try:
                page = c.audit(limit=EXPORT_PAGE, tenant=tenant, after_id=last)
            except RateLimitError as e:  # the control plane's per-key limit: wait, go on
                time.sleep(min(60.0, e.retry_after or 1.0))
                continue
            for e in page:
                out.write(json.dumps({
                    "id": e.id, "at": e.at, "actor": e.actor, "action": e.action,
                    "target": e.target, "tenant": e.tenant, "outcome": e.outcome,
                    "detail": e.detail,
                }, ensure_ascii=False) + "\n")
            out.flush()
            written += len(page)
            if page:
                last = page[-1].id
            if len(page) < EXPORT_PAGE:
                break
    print(f"exported {written} audit entries to {path} (up to id {last})", file=sys.stderr)


def _tenants(c, ns, action) -> None:
    if action == "create":
        reply = c.create_tenant(ns.id, display_name=ns.display_name or "", allow_base=ns.allow_base,
                                system_prompt=ns.system_prompt or "")
        print(("created tenant " if reply.created else "tenant exists (unchanged): ") + ns.id)
        _print_tenant(reply.tenant)
    elif action == "list":
        tenants = c.list_tenants()
        chunks = {}
        try:
            chunks = {t.tenant: t.chunks for t in c.knowledge_stats()}
        except Exception:  # noqa: BLE001 - the retrieval app may not run
            pass
        if not tenants:
            print("no tenants; create one with `hybridserve admin tenants create ID`")
        for t in tenants:
            _print_tenant(t)
            if t.id in chunks:
                print(f"  chunks: {chunks[t.id]}")
    elif action == "get":
        _print_tenant(c.get_tenant(ns.id))
    elif action == "update":
        _print_tenant(c.update_tenant(ns.id, display_name=ns.display_name,
                                      allow_base=ns.allow_base, system_prompt=ns.system_prompt))
    elif action == "delete":
        if not ns.yes:
            raise SystemExit(f"this deletes tenant {ns.id}, its keys and all its documents; "
                             "add --yes to confirm")
        reply = c.delete_tenant(ns.id)
        print(f"deleted tenant {ns.id}: {reply.deleted_keys} keys, {reply.deleted_chunks} chunks")


def _keys(c, ns, action) -> None:
    if action == "create":
        kind = "admin" if ns.admin else "tenant"
        if kind == "tenant" and not ns.tenant:
            raise SystemExit("name the tenant (or pass --admin for an admin key)")
        ttl = int(ns.ttl_days * 86400) if ns.ttl_days else 0
        reply = c.create_key("" if ns.admin else ns.tenant, name=ns.name or "", kind=kind,
                             ttl_seconds=ttl)
        print(reply.secret)
        k = reply.key
        print(f"{k.kind} key {k.key_id} ({k.name or 'unnamed'})"
              + (f" for tenant {k.tenant}" if k.tenant else "")
              + (f", expires {k.expires_at}" if k.expires_at else "")
              + ". This is the only time the key is shown; store it now.", file=sys.stderr)
    elif action == "list":
        for k in c.list_keys(ns.tenant or "", include_revoked=ns.all):
            state = f"revoked {k.revoked_at}" if k.revoked_at else (
                f"expires {k.expires_at}" if k.expires_at else "active")
            print(f"{k.prefix}\t{k.kind}\t{k.tenant or '-'}\t{k.name or '-'}\tcreated {k.created_at}"
                  f"\tlast used {k.last_used_at or 'never'}\t{state}")
    elif action == "revoke":
        k = c.revoke_key(ns.key_id)
        print(f"revoked {k.prefix} (every replica refuses it within a second)")


def add_admin_parser(sub) -> None:
    a = sub.add_parser("admin", help="tenants, API keys, adapter grants, quotas, audit (admin key)")
    asub = a.add_subparsers(dest="admin_cmd", required=True)
    a.set_defaults(func=cmd_admin)

    client_args(asub.add_parser("whoami", help="which key you are using"))
    asub.add_parser("generate-key", help="print a new admin key, offline (for the Helm chart's "
                    "admin Secret; the platform registers it at start)")

    t = asub.add_parser("tenants", help="manage tenants")
    tsub = t.add_subparsers(dest="admin_action", required=True)
    tc = tsub.add_parser("create", help="create a tenant (idempotent)")
    tc.add_argument("id")
    tc.add_argument("--display-name")
    tc.add_argument("--allow-base", action="store_true", help="may use the base model (no adapter)")
    tc.add_argument("--system-prompt")
    tl = tsub.add_parser("list", help="list tenants, their adapters, quotas and chunks")
    tg = tsub.add_parser("get", help="show one tenant")
    tg.add_argument("id")
    tu = tsub.add_parser("update", help="change a tenant's settings")
    tu.add_argument("id")
    tu.add_argument("--display-name")
    tu.add_argument("--allow-base", type=lambda v: v.lower() in ("1", "true", "yes"),
                    metavar="true|false")
    tu.add_argument("--system-prompt")
    td = tsub.add_parser("delete", help="delete a tenant, its keys and its documents")
    td.add_argument("id")
    td.add_argument("--yes", action="store_true", help="confirm")
    for sp in (tc, tl, tg, tu, td):
        client_args(sp)

    k = asub.add_parser("keys", help="manage API keys")
    ksub = k.add_subparsers(dest="admin_action", required=True)
    kc = ksub.add_parser("create", help="create a key (printed once)")
    kc.add_argument("tenant", nargs="?", default="")
    kc.add_argument("--name", help="what the key is for, e.g. ci-bot")
    kc.add_argument("--admin", action="store_true", help="an admin key instead of a tenant key")
    kc.add_argument("--ttl-days", type=float, help="expire after this many days (default: never)")
    kl = ksub.add_parser("list", help="list keys (never their secrets)")
    kl.add_argument("tenant", nargs="?", default="")
    kl.add_argument("--all", action="store_true", help="include revoked keys")
    kr = ksub.add_parser("revoke", help="revoke a key")
    kr.add_argument("key_id", help="the key id (the part after hst_ / hsa_)")
    for sp in (kc, kl, kr):
        client_args(sp)

    g = asub.add_parser("grants", help="which adapters a tenant may use")
    gsub = g.add_subparsers(dest="admin_action", required=True)
    ga = gsub.add_parser("add", help="grant a registered adapter (name@version)")
    ga.add_argument("tenant")
    ga.add_argument("adapter")
    ga.add_argument("--default", action="store_true", help="also make it the tenant's default")
    gr = gsub.add_parser("revoke", help="remove a grant")
    gr.add_argument("tenant")
    gr.add_argument("adapter")
    for sp in (ga, gr):
        client_args(sp)

    q = asub.add_parser("quotas", help="per-tenant limits")
    qsub = q.add_subparsers(dest="admin_action", required=True)
    qs = qsub.add_parser("set", help="set limits (0 removes one; unset ones stay)")
    qs.add_argument("tenant")
    qs.add_argument("--rpm", type=int, help="requests per minute")
    qs.add_argument("--tpm", type=int, help="prompt + completion tokens per minute")
    qs.add_argument("--concurrency", type=int, help="streams open at once")
    client_args(qs)

    ap = asub.add_parser("apply", help="make tenants match a tenants file (idempotent)")
    ap.add_argument("-f", "--file", required=True, help="the YAML tenants file, or - for stdin")
    ap.add_argument("--dry-run", action="store_true", help="print what would change; change nothing")
    ap.add_argument("--keep-grants", action="store_true",
                    help="never remove a grant the file does not list, nor a default it does not "
                    "name (grants managed by LoRAAdapter resources on Kubernetes)")
    client_args(ap)

    au = asub.add_parser("audit", help="who did what, when, with what outcome")
    au.add_argument("--limit", type=int, default=50)
    au.add_argument("--tenant", default="")
    au.add_argument("--export", metavar="FILE.jsonl",
                    help="append every entry the file does not have yet, oldest first, as JSON "
                    "lines (resumes after the file's last id; run it more often than the "
                    "retention, tenancy.audit_retention_days, to keep the log longer)")
    client_args(au)
