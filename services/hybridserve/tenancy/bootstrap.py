"""The first admin key: secure by default, yet a first run needs no setup.

On start, `hybridserve up` (and the admin app on a cluster) calls
`ensure_admin_key`:

- an admin key in the environment variable `tenancy.admin_key_env` (e.g. from a
  Kubernetes Secret) is registered by its digest, once;
- when no admin key exists at all, one is created and written to
  `tenancy.admin_key_file` (<data_dir>/admin.key) with mode 0600, where the local
  CLI finds it. The key is printed nowhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hybridserve.errors import FailedPrecondition, InvalidArgument
from hybridserve.tenancy import keys
from hybridserve.tenancy.store import TenancyStore

BOOTSTRAP_ACTOR = "bootstrap"


@dataclass(frozen=True)
class Bootstrap:
    #: Where a newly created admin key was written (None: none was created).
    created_file: Path | None
    #: The key id of an admin key registered from the environment.
    from_env: str | None = None


def _write_private(path: Path, text: str) -> None:
    """Writes `text` to `path` with mode 0600 from the first byte, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_key_file(path: Path) -> str:
    """The key in a key file (the first non-empty line)."""
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            return line.strip()
    raise InvalidArgument(f"{path} holds no key")


def register_env_admin_key(store: TenancyStore, env_var: str) -> str | None:
    """Registers the admin key in `$env_var` by its digest (once); returns its key id,
    or None when the variable is unset or empty."""
    from_env = None
    env_key = os.environ.get(env_var, "").strip() if env_var else ""
    if env_key:
        try:
            parsed = keys.parse(env_key)
        except keys.MalformedKey as e:
            raise FailedPrecondition(f"${env_var} does not hold a hybridserve key: {e}") from None
        if parsed.kind != "admin":
            raise FailedPrecondition(f"${env_var} holds a tenant key; it must be an admin key (hsa_...)")
        found = store.get_key(parsed.key_id)
        if found is None:
            store.add_key(key_id=parsed.key_id, kind="admin", tenant_id=None, name=f"${env_var}",
                          digest=parsed.digest, expires_at=None, actor=BOOTSTRAP_ACTOR)
        elif not keys.matches(parsed, found[1]):
            raise FailedPrecondition(
                f"${env_var} names key id {parsed.key_id}, which exists with a different secret"
            )
        from_env = parsed.key_id
    return from_env


def ensure_admin_key(store: TenancyStore, key_file: Path, env_var: str = "") -> Bootstrap:
    """Makes sure an admin key exists (see the module docstring)."""
    from_env = register_env_admin_key(store, env_var)
    if store.has_admin_key():
        return Bootstrap(None, from_env)
    key = keys.generate("admin")
    # NOTE: the file first: if the insert then fails, the next start finds no admin
    # key and makes a new one; the other order could leave a key nobody has.
    _write_private(key_file, f"# hybridserve admin key ({keys.display_prefix('admin', key.key_id)})\n{key.key}\n")
    store.add_key(key_id=key.key_id, kind="admin", tenant_id=None, name="first admin key",
                  digest=key.digest, expires_at=None, actor=BOOTSTRAP_ACTOR)
    return Bootstrap(key_file, from_env)
