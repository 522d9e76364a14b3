"""`tandem key new` / `tandem key hash`, and the keys file of a mounted Secret."""

from __future__ import annotations

import re

import pytest

from serving.cli import main
from serving.config import AuthSpec, SpecError
from serving.http.auth import Authenticator, AuthError, hash_key, load_keys_file


def test_key_new_prints_a_key_whose_entry_authenticates(capsys) -> None:
    assert main(["key", "new", "--tenant", "acme"]) == 0
    out = capsys.readouterr().out
    key = re.search(r"key .*: (\S+)", out).group(1)
    digest = re.search(r"sha256: ([0-9a-f]{64})", out).group(1)
    assert digest == hash_key(key) and key not in out.split("sha256")[1]
    auth = Authenticator(AuthSpec(keys=[{"tenant": "acme", "sha256": digest}]), "default")
    assert auth.tenant(f"Bearer {key}", None) == "acme"
    with pytest.raises(AuthError):
        auth.tenant(f"Bearer {key}x", None)


def test_key_new_rejects_a_bad_tenant_name(capsys) -> None:
    assert main(["key", "new", "--tenant", "Not OK"]) == 2
    assert "tenant" in capsys.readouterr().err


def test_key_hash(capsys) -> None:
    assert main(["key", "hash", "secret"]) == 0
    assert capsys.readouterr().out.strip() == hash_key("secret")


def test_keys_file_yaml_and_errors(tmp_path) -> None:
    good = tmp_path / "keys.yaml"
    good.write_text(f"- {{tenant: a, sha256: {hash_key('ka')}}}\n- {{tenant: b, sha256: {hash_key('kb')}}}\n")
    auth = Authenticator(AuthSpec(keys_file=str(good)), "default")
    assert auth.tenant("Bearer kb", None) == "b"
    assert [k.tenant for k in load_keys_file(str(good))] == ["a", "b"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {tenant: a, sha256: nothex}\n")
    with pytest.raises(SpecError, match="entry 0"):
        load_keys_file(str(bad))
    with pytest.raises(SpecError, match="cannot read"):
        load_keys_file(str(tmp_path / "missing.yaml"))
    with pytest.raises(SpecError, match="no keys"):
        Authenticator(AuthSpec(), "default")
