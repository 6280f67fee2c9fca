"""The proxy guard's admission (hybridserve.proxy_guard), on fake gRPC contexts; the
real proxy is exercised in tests/integration/test_hostile.py."""

from __future__ import annotations

from hybridserve.proxy_guard import GuardLimits, ProxyGuard, credential_problem
from hybridserve.tenancy import keys


class Ctx:
    def __init__(self, peer="ipv4:127.0.0.1:1000", key=None):
        self._peer = peer
        self._md = [("application", "generation")]
        if key is not None:
            self._md.append(("authorization", f"Bearer {key}"))

    def invocation_metadata(self):
        return self._md

    def peer(self):
        return self._peer


def _key() -> str:
    return keys.generate("tenant").key


def test_no_key_or_a_malformed_one_is_a_credential_problem():
    assert credential_problem(Ctx().invocation_metadata()).reason == "API_KEY_MISSING"
    assert credential_problem(Ctx(key="nope").invocation_metadata()).reason == "API_KEY_MALFORMED"
    assert credential_problem([("authorization", "Basic abc")]).reason == "API_KEY_MALFORMED"
    assert credential_problem(Ctx(key=_key()).invocation_metadata()) is None


def test_keyless_calls_are_refused_unless_allowed_and_capped():
    guard = ProxyGuard(GuardLimits(max_keyless=2, max_per_connection=100))
    refusal, _, _ = guard.enter(Ctx(), keyless_ok=False)
    assert refusal.code == "UNAUTHENTICATED"
    held = [guard.enter(Ctx(peer=f"p{i}"), keyless_ok=True) for i in range(2)]
    assert all(r is None for r, _, _ in held)
    refusal, _, _ = guard.enter(Ctx(peer="p9"), keyless_ok=True)
    assert refusal.code == "RESOURCE_EXHAUSTED" and refusal.reason == "KEYLESS_LIMIT"
    assert refusal.retry_after > 0
    # Keyed calls are not keyless: they pass.
    assert guard.enter(Ctx(peer="p9", key=_key()), keyless_ok=False)[0] is None
    _, keyless, peer = held[0]
    guard.exit(keyless, peer)
    assert guard.enter(Ctx(peer="p9"), keyless_ok=True)[0] is None


def test_one_connection_holds_at_most_its_share():
    guard = ProxyGuard(GuardLimits(max_keyless=100, max_per_connection=3))
    key = _key()
    admitted = [guard.enter(Ctx(key=key), keyless_ok=False) for _ in range(3)]
    refusal, _, _ = guard.enter(Ctx(key=key), keyless_ok=False)
    assert refusal.reason == "CONNECTION_LIMIT"
    assert guard.enter(Ctx(peer="other", key=key), keyless_ok=False)[0] is None
    for _, keyless, peer in admitted:
        guard.exit(keyless, peer)
    assert guard.per_peer == {"other": 1}


def test_limits_come_from_the_environment_and_bad_values_keep_defaults():
    limits = GuardLimits.from_env({"HYBRIDSERVE_PROXY_MAX_KEYLESS": "5",
                                   "HYBRIDSERVE_HEALTH_POLL_S": "x"})
    assert limits.max_keyless == 5 and limits.poll_s == GuardLimits().poll_s
