"""The Serve config-file entry point builds the same app as `dheads serve`."""
import pytest

from dheads.model.checkpoint import CheckpointError
from dheads.platform.config import ConfigError
from dheads.serve.app import app_builder
from dheads.serve.security import bearer, parse_tokens, tenant_of

SECRET = "s" * 40


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, dub_inputs):
    return dub_inputs.tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def test_app_builder_composes_overrides(monkeypatch, checkpoint):
    monkeypatch.setenv("DHEADS_API_TOKEN", SECRET)
    app = app_builder({"overrides": [f"checkpoint={checkpoint}", "serve.autoscaling.max_replicas=3",
                                     "sampler.steps=ddim5"]})
    # Application -> the ingress deployment, bound to (model app, ServeJob, token)
    ingress = app._bound_deployment
    model_app, job, tokens = ingress.init_args
    assert tokens == {"default": SECRET}
    assert job.checkpoint == str(checkpoint) and job.sampler.steps == "ddim5"
    model = model_app._bound_deployment
    assert model.name == "DubbingModel" and model.name != ingress.name
    assert model._deployment_config.autoscaling_config.max_replicas == 3
    assert ingress._deployment_config.num_replicas == 1  # the ingress owns the running jobs


def test_app_builder_rejects_typos(monkeypatch):
    monkeypatch.setenv("DHEADS_API_TOKEN", SECRET)
    with pytest.raises(ConfigError, match="serve.nope"):
        app_builder({"overrides": ["serve.nope=1"]})


def test_app_builder_needs_a_token(monkeypatch, checkpoint):
    monkeypatch.delenv("DHEADS_API_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="token"):
        app_builder({"overrides": [f"checkpoint={checkpoint}"]})


def test_app_builder_needs_a_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setenv("DHEADS_API_TOKEN", SECRET)
    with pytest.raises(CheckpointError, match="dheads export"):
        app_builder({"overrides": [f"checkpoint={tmp_path / 'missing'}"]})


def test_short_tokens_are_refused_at_start(monkeypatch, checkpoint, tmp_path):
    monkeypatch.setenv("DHEADS_API_TOKEN", "x" * 31)
    with pytest.raises(ConfigError, match="31 characters; tokens must be at least 32"):
        app_builder({"overrides": [f"checkpoint={checkpoint}"]})
    tokens = tmp_path / "tokens"
    tokens.write_text(f"acme: {'a' * 40}\nshort: {'b' * 12}\n")
    with pytest.raises(ConfigError, match="line 2: the token of tenant 'short' is 12 characters"):
        app_builder({"overrides": [f"checkpoint={checkpoint}", f"serve.tokens_file={tokens}"]})


def test_tokens_file_and_bearer_parsing():
    tokens = parse_tokens(f"# comment\n\nacme: {'a' * 40}\nbeta:{'b' * 33}\n", "f")
    assert tokens == {"acme": "a" * 40, "beta": "b" * 33}
    for bad, words in [(f"acme {'a' * 40}", "expected `tenant: token`"),
                       (f"a/b: {'a' * 40}", "must match"),
                       (f"x: {'a' * 40}\ny: {'a' * 40}", "share one token"),
                       (f"x: {'a' * 40}\nx: {'b' * 40}", "appears twice"), ("", "no `tenant: token`")]:
        with pytest.raises(ConfigError, match=words):
            parse_tokens(bad, "f")
    assert bearer("bearer abc") == bearer("BEARER abc") == bearer("Bearer  abc ") == "abc"
    assert bearer("Basic abc") is None and bearer("Bearer") is None and bearer(None) is None
    assert tenant_of(f"bEaReR {'b' * 33}", tokens) == "beta"
    assert tenant_of(f"Bearer {'b' * 32}", tokens) is None


def test_the_service_state_can_never_be_allowed(monkeypatch, checkpoint, tmp_path):
    monkeypatch.setenv("DHEADS_API_TOKEN", SECRET)
    with pytest.raises(ConfigError, match="inside the service's own state"):
        app_builder({"overrides": [f"checkpoint={checkpoint}", f"serve.job_store={tmp_path}/js",
                                   f'serve.allowed_uris=["{tmp_path}/js/uploads"]']})
    with pytest.raises(ConfigError, match="cannot hold leases"):
        app_builder({"overrides": [f"checkpoint={checkpoint}", "serve.job_store=s3://b/jobs"]})
    with pytest.raises(ConfigError, match="serve.upload_dir is required"):
        app_builder({"overrides": [f"checkpoint={checkpoint}", "serve.job_store=postgresql://h/db"]})


def test_outputs_are_mp4s_outside_the_served_model_and_every_checkpoint(tmp_path):
    from dheads.serve.security import UriForbidden, UriPolicy

    runs = tmp_path / "runs"
    (runs / "export").mkdir(parents=True)
    (runs / "export" / "model.safetensors").write_bytes(b"weights")
    (runs / "r1" / "step_00000200").mkdir(parents=True)
    (runs / "r1" / "step_00000200" / ".metadata").write_bytes(b"dcp")
    policy = UriPolicy([str(runs)], state=[str(runs / "jobstore")], protected=[str(runs / "export")])
    for out, words in [(runs / "export" / "model.safetensors", ".mp4 files"),
                       (runs / "export" / "x.mp4", "inside the served checkpoint"),
                       (runs / "r1" / "step_00000200" / "a.mp4", "inside a checkpoint folder"),
                       (runs / "r1" / "step_00000200" / "sub" / "a.mp4", "inside a checkpoint folder"),
                       (runs / "dubbed" / "a.MKV", ".mp4 files"),
                       (runs / "jobstore" / "a.mp4", "own state")]:
        with pytest.raises(UriForbidden, match=words):
            policy.check_output(str(out))
    assert policy.check_output(str(runs / "dubbed" / "a.mp4")) == str((runs / "dubbed" / "a.mp4").resolve())
    assert policy.check_output(str(runs / "r1" / "a.mp4"))          # beside the run's steps, not inside one
    assert policy.check(str(runs / "export" / "model.safetensors"))  # inputs are not outputs
    s3 = UriPolicy(["s3://b/runs"], protected=["s3://b/runs/export"])
    assert s3.check_output("s3://b/runs/o.mp4") == "s3://b/runs/o.mp4"
    with pytest.raises(UriForbidden, match="served checkpoint"):
        s3.check_output("s3://b/runs/export/o.mp4")


def test_ingresses_sharing_a_sqlite_store_all_run_on_the_head_node(monkeypatch, checkpoint, tmp_path):
    from dheads.serve.app import HEAD_NODE_RESOURCE

    monkeypatch.setenv("DHEADS_API_TOKEN", SECRET)
    sqlite = app_builder({"overrides": [f"checkpoint={checkpoint}", f"serve.job_store={tmp_path}/js",
                                        "serve.ingress_replicas=3"]})._bound_deployment
    assert sqlite.ray_actor_options["resources"] == {HEAD_NODE_RESOURCE: 0.001}
    assert sqlite._deployment_config.num_replicas == 3
    pg = app_builder({"overrides": [f"checkpoint={checkpoint}", "serve.job_store=postgresql://h/db",
                                    f"serve.upload_dir={tmp_path}/up", "serve.ingress_replicas=3"]})
    assert HEAD_NODE_RESOURCE not in (pg._bound_deployment.ray_actor_options.get("resources") or {})


def test_several_tenants_need_per_tenant_storage(checkpoint, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"acme: {'a' * 40}\nbeta: {'b' * 40}\n")
    base = [f"checkpoint={checkpoint}", f"serve.tokens_file={tokens}", f"serve.job_store={tmp_path}/js"]
    with pytest.raises(ConfigError, match=r"2 tenants \(acme, beta\) but 'runs/'.*has no \{tenant\}"):
        app_builder({"overrides": base})                              # the default allow-list is shared
    with pytest.raises(ConfigError, match="serve.output_dir"):
        app_builder({"overrides": base + [f'serve.allowed_uris=["{tmp_path}/out/{{tenant}}"]']})
    app = app_builder({"overrides": base + [f'serve.allowed_uris=["{tmp_path}/out/{{tenant}}"]',
                                            f"serve.output_dir='{tmp_path}/out/{{tenant}}'",
                                            f'serve.shared_uris=["{tmp_path}/voices"]']})
    job = app._bound_deployment.init_args[1]
    assert job.serve.shared_uris == [f"{tmp_path}/voices"]


def test_shared_uris_are_read_only_and_tenants_apart(tmp_path):
    from dheads.serve.security import UriForbidden, UriPolicy

    policy = UriPolicy([f"{tmp_path}/t/{{tenant}}"], shared=[f"{tmp_path}/voices"])
    assert policy.check(f"{tmp_path}/voices/v.wav", "acme")
    assert policy.check_output(f"{tmp_path}/t/acme/o.mp4", "acme")
    with pytest.raises(UriForbidden, match="serve.shared_uris"):
        policy.check_output(f"{tmp_path}/voices/o.mp4", "acme")
    with pytest.raises(UriForbidden, match="outside the allowed"):
        policy.check(f"{tmp_path}/t/beta/o.mp4", "acme")


def test_multipart_is_refused_on_the_serve_port_without_the_listener():
    """Serve's proxy queues a whole body before the handler (and the token
    check) runs: with the upload listener on, multipart goes there (421);
    with it off, the Serve port refuses it (415) unless explicitly accepted."""
    from dheads.platform.config import compose
    from dheads.serve.ingress import multipart_refusal

    s = compose("serve", []).serve
    status, why = multipart_refusal(s, 8001, "10.0.0.5")
    assert status == 421 and "http://10.0.0.5:8001/v1/jobs" in why
    off = compose("serve", ["serve.upload_port=null"]).serve
    status, why = multipart_refusal(off, None, "h")
    assert status == 415 and "submit their URIs" in why
    opted = compose("serve", ["serve.upload_port=null", "serve.multipart_via_serve=true"]).serve
    assert multipart_refusal(opted, None, "h") is None
