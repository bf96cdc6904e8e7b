"""The Serve config-file entry point builds the same app as `dheads serve`."""
import pytest
from ray.serve import Application

from dheads.platform.config import ConfigError
from dheads.serve.app import app_builder


def test_app_builder_composes_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("DHEADS_API_TOKEN", "secret")
    app = app_builder({"overrides": [f"checkpoint={tmp_path}", "serve.autoscaling.max_replicas=3"]})
    assert isinstance(app, Application)


def test_app_builder_rejects_typos(monkeypatch):
    monkeypatch.setenv("DHEADS_API_TOKEN", "secret")
    with pytest.raises(ConfigError, match="serve.nope"):
        app_builder({"overrides": ["serve.nope=1"]})


def test_app_builder_needs_a_token(monkeypatch):
    monkeypatch.delenv("DHEADS_API_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="token"):
        app_builder({})
