"""service/config.py: owners of API keys."""

from __future__ import annotations

from service.config import Settings, key_owner


def test_keys_without_owner_with_a_common_prefix_get_different_owners():
    keys = Settings(api_keys="hospital-A-9f8e7d, hospital-B-1a2b3c ,k1:alice").keys()
    assert keys["k1"] == "alice"
    a, b = keys["hospital-A-9f8e7d"], keys["hospital-B-1a2b3c"]
    assert a != b
    assert a == key_owner("hospital-A-9f8e7d") and a.startswith("key-") and len(a) == 20
    assert "hospit" not in a and "9f8e7d" not in a  # the name does not show the key


def test_key_owner_is_stable_and_whole_key_dependent():
    assert key_owner("abc") == key_owner("abc")
    owners = {key_owner(f"same-prefix-{i}") for i in range(1000)}
    assert len(owners) == 1000
