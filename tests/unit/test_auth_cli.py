"""`tandem key new` / `tandem key hash`, and the keys file of a mounted Secret."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re

import pytest
import yaml

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


def test_key_hash_reads_the_key_from_stdin(capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("secret\n"))
    assert main(["key", "hash"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == hash_key("secret") and "warning" not in out.err
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["key", "hash"]) == 2
    assert "no key" in capsys.readouterr().err


def test_key_hash_on_argv_still_works_but_warns(capsys) -> None:
    assert main(["key", "hash", "secret"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == hash_key("secret")
    assert "shell history" in out.err and "stdin" not in out.out


def test_key_new_with_the_metrics_scope(capsys) -> None:
    assert main(["key", "new", "--tenant", "prom", "--scope", "metrics"]) == 0
    out = capsys.readouterr().out
    key = re.search(r"key .*: (\S+)", out).group(1)
    entry = yaml.safe_load(out.split("Secret:")[1])[0]
    assert entry == {"tenant": "prom", "sha256": hash_key(key), "scopes": ["metrics"]}
    auth = Authenticator(AuthSpec(keys=[entry]), "default")
    assert auth.tenant(f"Bearer {key}", None, "metrics") == "prom"
    with pytest.raises(AuthError, match="inference"):
        auth.tenant(f"Bearer {key}", None)


def test_key_new_for_an_operator_limited_to_two_models(capsys) -> None:
    argv = ["key", "new", "--tenant", "ops", "--scope", "inference", "--scope", "debug"]
    assert main([*argv, "--model", "intent", "--model", "big", "--model", "intent"]) == 0
    out = capsys.readouterr().out
    key = re.search(r"key .*: (\S+)", out).group(1)
    entry = yaml.safe_load(out.split("Secret:")[1])[0]
    want = {
        "tenant": "ops",
        "sha256": hash_key(key),
        "scopes": ["debug", "inference"],
        "models": ["intent", "big"],
    }
    assert entry == want
    caller = Authenticator(AuthSpec(keys=[entry]), "default").caller(f"Bearer {key}", None)
    assert caller.debug and caller.models == frozenset({"intent", "big"})
    with pytest.raises(SystemExit) as e:  # argparse: the choices are KeyScope's
        main(["key", "new", "--tenant", "ops", "--scope", "root"])
    assert e.value.code == 2
    assert "debug" in capsys.readouterr().err


def test_keys_file_is_reloaded_after_the_interval_only(tmp_path, caplog) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(f"- {{tenant: a, sha256: {hash_key('ka')}}}\n")
    now = [0.0]
    auth = Authenticator(AuthSpec(keys_file=str(path), keys_reload_s=5), "default", clock=lambda: now[0])

    def replace(text: str) -> None:
        tmp = tmp_path / "new.yaml"
        tmp.write_text(text)
        os.replace(tmp, path)

    replace(f"- {{tenant: b, sha256: {hash_key('kb')}}}\n")
    now[0] = 4.9
    asyncio.run(auth.refresh())  # not due: the old key still works
    assert auth.tenant("Bearer ka", None) == "a"
    now[0] = 5.0
    asyncio.run(auth.refresh())
    with pytest.raises(AuthError, match="invalid"):
        auth.tenant("Bearer ka", None)
    assert auth.tenant("Bearer kb", None) == "b"
    # Unchanged: nothing is read again; a broken change keeps the keys and is logged once.
    assert auth.reload() is False
    replace("- {tenant: b, sha256: nothex}\n")
    with caplog.at_level(logging.WARNING):
        assert auth.reload() is False and auth.reload() is False
    assert caplog.text.count("keeping the 1 keys in use") == 1
    assert auth.tenant("Bearer kb", None) == "b"


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
