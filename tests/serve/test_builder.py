"""The Serve config-file entry point builds the same app as `dheads serve`."""
import pytest

from dheads.model.checkpoint import CheckpointError
from dheads.platform.config import ConfigError
from dheads.serve.app import app_builder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, dub_inputs):
    return dub_inputs.tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def test_app_builder_composes_overrides(monkeypatch, checkpoint):
    monkeypatch.setenv("DHEADS_API_TOKEN", "secret")
    app = app_builder({"overrides": [f"checkpoint={checkpoint}", "serve.autoscaling.max_replicas=3",
                                     "sampler.steps=ddim5"]})
    # Application -> the ingress deployment, bound to (model app, ServeJob, token)
    ingress = app._bound_deployment
    model_app, job, token = ingress.init_args
    assert token == "secret"
    assert job.checkpoint == str(checkpoint) and job.sampler.steps == "ddim5"
    model = model_app._bound_deployment
    assert model.name == "DubbingModel" and model.name != ingress.name
    assert model._deployment_config.autoscaling_config.max_replicas == 3
    assert ingress._deployment_config.num_replicas == 1  # the ingress owns the running jobs


def test_app_builder_rejects_typos(monkeypatch):
    monkeypatch.setenv("DHEADS_API_TOKEN", "secret")
    with pytest.raises(ConfigError, match="serve.nope"):
        app_builder({"overrides": ["serve.nope=1"]})


def test_app_builder_needs_a_token(monkeypatch, checkpoint):
    monkeypatch.delenv("DHEADS_API_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="token"):
        app_builder({"overrides": [f"checkpoint={checkpoint}"]})


def test_app_builder_needs_a_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setenv("DHEADS_API_TOKEN", "secret")
    with pytest.raises(CheckpointError, match="dheads export"):
        app_builder({"overrides": [f"checkpoint={tmp_path / 'missing'}"]})
