"""The serve app's secrets: only the tokens' hashes leave the machine that holds the tokens."""

from __future__ import annotations

import hashlib
import re

import pytest
import yaml

from distill_ray.config.schema import Serve
from distill_ray.serve.deployment import ServeRefused, _token_sha256
from tests.conftest import ROOT


def test_the_hash_comes_from_the_token_or_from_a_mounted_hash(monkeypatch):
    digest = hashlib.sha256(b"s3cret").hexdigest()
    monkeypatch.setenv("T_ENV", "s3cret")
    assert _token_sha256("T_ENV", "auth_token_env") == digest
    monkeypatch.delenv("T_ENV")
    monkeypatch.setenv("T_ENV_SHA256", digest.upper())
    assert _token_sha256("T_ENV", "auth_token_env") == digest
    monkeypatch.setenv("T_ENV_SHA256", "not-a-hash")
    with pytest.raises(ServeRefused, match="serve.auth_token_env: environment variable T_ENV"):
        _token_sha256("T_ENV", "auth_token_env")
    assert _token_sha256(None, "admin_token_env") is None


def test_the_rayservice_mounts_hashes_only():
    text = (ROOT / "cluster" / "kuberay" / "rayservice.yaml").read_text()
    manifest = yaml.safe_load(re.sub(r"\$\{(\w+)\}", r"\1", text))
    env = {e["name"]: e for c in manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
           for e in c.get("env", [])}
    defaults = Serve()
    for var in (defaults.auth_token_env, defaults.admin_token_env):
        assert var not in text.replace(f"{var}_SHA256", "")  # the token itself is mounted nowhere
        ref = env[f"{var}_SHA256"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "serve-auth-token" and ref["key"] in ("sha256", "admin-sha256")
    assert "key: token" not in text


def test_an_open_endpoint_is_an_explicit_choice():
    from distill_ray.config.schema import PipelineConfig

    for serve, words in (({"auth_token_env": None}, "serve.auth_token_env: null leaves the endpoint open"),
                         ({"admin_token_env": None}, "serve.admin_token_env: null"),
                         ({"admin_token_env": "DISTILL_SERVE_TOKEN"}, "apart from the API clients' token"),
                         ({"max_tokens": 8}, "serve.max_tokens (8) is below teachers.")):
        with pytest.raises(ValueError, match=re.escape(words)):
            PipelineConfig.model_validate({"serve": serve})
    opened = PipelineConfig.model_validate({"serve": {"auth_token_env": None, "admin_token_env": None,
                                                      "allow_open_endpoint": True}})
    assert opened.serve.auth_token_env is None
