"""A workflow reads only the environment variables an operator exposed for it (AMPEL_DASK_SECRET_*):
the Kafka password never reaches a webhook, whatever the workflow names; an exposed secret does."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fastavro
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ampel_dask.graph.plan import plan_workflow
from ampel_dask.graph.workflow import WorkflowError, load_workflow
from ampel_dask.graph.ingest import IngestOptions, ingest
from ampel_dask.io.kafka_auth import ENV_PREFIX, KafkaCredentials
from ampel_dask.tiers.base import UnitConfigError
from ampel_dask.tiers.env import read_variable, workflow_variable
from ampel_dask.tiers.units.t3_webhook import T3Webhook

PROXIES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
# every variable the Kafka credential loader reads, from its own model: a workflow may name none of them
KAFKA_VARIABLES = [ENV_PREFIX + name.upper() for name in KafkaCredentials.model_fields]


def allowed(name: str) -> bool:
    """The rule in plain words: AMPEL_DASK_SECRET_ and then 1-100 capitals, digits or underscores."""
    prefix = "AMPEL_DASK_SECRET_"
    rest = name[len(prefix):]
    return name.startswith(prefix) and 1 <= len(rest) <= 100 and all(c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_" for c in rest)


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.text(max_size=40).map(lambda s: "AMPEL_DASK_SECRET_" + s),
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789", max_size=130).map(lambda s: "AMPEL_DASK_SECRET_" + s),
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ_", max_size=40),
    st.sampled_from(KAFKA_VARIABLES + ["HOME", "PATH", "AWS_SECRET_ACCESS_KEY", "ampel_dask_secret_x", "AMPEL_DASK_SECRET_"]),
))
def test_a_workflow_may_name_exactly_the_exposed_variables(name):
    accepted = True
    try:
        assert workflow_variable(name) == name
    except ValueError as exc:
        accepted = False
        assert "is not readable by a workflow" in str(exc)
    assert accepted == allowed(name)
    for config in ({"url_env": name}, {"url": "http://127.0.0.1:9/x", "headers_from_env": {"X-Key": name}}):
        try:
            T3Webhook(config)
            assert accepted
        except UnitConfigError as exc:
            assert not accepted and "is not readable by a workflow" in str(exc)


def test_reading_checks_the_name_again(monkeypatch):
    """A unit built around validation (``model_construct``) still cannot read a credential."""
    monkeypatch.setenv("AMPEL_DASK_KAFKA_SASL_PASSWORD", "kafka-pw")
    monkeypatch.setenv("AMPEL_DASK_SECRET_TOKEN", "exposed")
    assert read_variable("AMPEL_DASK_SECRET_TOKEN") == "exposed"
    with pytest.raises(ValueError, match="'AMPEL_DASK_KAFKA_SASL_PASSWORD' \\(a Kafka credential\\) is not readable"):
        read_variable("AMPEL_DASK_KAFKA_SASL_PASSWORD")
    unit = T3Webhook(url="http://127.0.0.1:9/x")
    unit.config = unit.Config.model_construct(**{**unit.config.model_dump(), "headers_from_env": {"X-Leak": "AMPEL_DASK_KAFKA_SASL_PASSWORD"}})
    with pytest.raises(ValueError, match="not readable by a workflow"):
        unit._endpoint()


def _webhook_workflow(config: dict) -> str:
    return yaml.safe_dump({"name": "hook", "archive": {"surveys": ["ztf"]}, "channels": [{"name": "ALL", "t3": [{"unit": "T3Webhook", "config": config}]}]}, sort_keys=False)


@pytest.mark.parametrize("variable", KAFKA_VARIABLES[:6] + ["AMPEL_DASK_KAFKA_BOOTSTRAP", "HOME"])
def test_planning_refuses_other_variables_with_field_and_line(tmp_path, variable):
    for config, field in [({"url": "http://127.0.0.1:9/x", "headers_from_env": {"X-Leak": variable}}, "headers_from_env.X-Leak"),
                          ({"url_env": variable}, "url_env")]:  # fmt: skip
        text = _webhook_workflow(config)
        path = tmp_path / "wf.yml"
        path.write_text(text)
        with pytest.raises(WorkflowError) as err:
            plan_workflow(load_workflow(path))
        line = next(i for i, ln in enumerate(text.splitlines(), 1) if variable in ln)
        assert f"wf.yml:{line}: channels[0] (ALL).t3[0].config.{field}: Value error, environment variable {variable!r}" in str(err.value), err.value


# --- a real HTTP server: what reaches it -----------------------------------------------------------


@pytest.fixture
def hook():
    """A local HTTP endpoint recording every request whole: path, headers, raw body."""
    received: list[dict] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with lock:
                received.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body,
                                 "raw": self.raw_requestline + bytes(self.headers) + body})  # fmt: skip
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield received, f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory, data_dir) -> tuple[Path, set[str]]:
    """40 real ZTF alerts; the object ids read from the packets with fastavro (the payload's oracle)."""
    src = data_dir / "ztf/fink_local_202001"
    root = tmp_path_factory.mktemp("secret_archive")
    ingest([str(src)], root, IngestOptions(workers=0, progress=False))
    objects = set()
    for p in src.glob("*.avro"):
        with open(p, "rb") as fh:
            objects |= {r["objectId"] for r in fastavro.reader(fh)}
    return root, objects


def run(path: Path, archive: Path, store: Path, env: dict) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in PROXIES}
    return subprocess.run([sys.executable, "-m", "ampel_dask.cli", "run", str(path), "--archive", str(archive), "--store", str(store), "--workers", "0", "--no-progress"],
                          capture_output=True, text=True, timeout=600, env={**base, "PYTHONWARNINGS": "ignore", **env})  # fmt: skip


def test_the_kafka_password_never_reaches_a_webhook_an_exposed_secret_does(tmp_path, hook, small_archive):
    """The same environment for every run: Kafka credentials and two exposed secrets. A workflow that
    names a Kafka variable is refused before anything is sent (exit 2, the variable named, its value
    nowhere); one that names the exposed secrets runs, and the server gets them in the header and URL,
    the alerts' objects in the payload, and the Kafka password in no request, header or payload."""
    received, url = hook
    archive, objects = small_archive
    password, token, path_secret = (secrets.token_hex(16) for _ in range(3))
    env = {"AMPEL_DASK_KAFKA_SASL_USERNAME": "broker-user", "AMPEL_DASK_KAFKA_SASL_PASSWORD": password,
           "AMPEL_DASK_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "AMPEL_DASK_SECRET_HOOK_TOKEN": token,
           "AMPEL_DASK_SECRET_HOOK_URL": f"{url}/{path_secret}"}  # fmt: skip
    wf = tmp_path / "wf.yml"
    for attempt in [{"url": url, "headers_from_env": {"X-Leak": "AMPEL_DASK_KAFKA_SASL_PASSWORD"}},
                    {"url_env": "AMPEL_DASK_KAFKA_SASL_PASSWORD"},
                    {"url": url, "headers_from_env": {"X-Ok": "AMPEL_DASK_SECRET_HOOK_TOKEN", "X-Leak": "AMPEL_DASK_KAFKA_SASL_PASSWORD"}}]:  # fmt: skip
        text = _webhook_workflow(attempt)
        wf.write_text(text)
        proc = run(wf, archive, tmp_path / "store", env)
        line = next(i for i, ln in enumerate(text.splitlines(), 1) if "AMPEL_DASK_KAFKA_SASL_PASSWORD" in ln)
        assert proc.returncode == 2, proc.stderr
        assert f"wf.yml:{line}: channels[0] (ALL).t3[0].config." in proc.stderr and "'AMPEL_DASK_KAFKA_SASL_PASSWORD' (a Kafka credential)" in proc.stderr, proc.stderr
        assert password not in proc.stdout + proc.stderr and token not in proc.stdout + proc.stderr
    assert received == []  # refused at planning: nothing was sent

    wf.write_text(_webhook_workflow({"url_env": "AMPEL_DASK_SECRET_HOOK_URL", "headers_from_env": {"X-Token": "AMPEL_DASK_SECRET_HOOK_TOKEN"}, "batch_size": 15}))
    proc = run(wf, archive, tmp_path / "store", env)
    assert proc.returncode == 0, proc.stderr
    assert received, "the webhook was never called"
    assert all(r["headers"]["x-token"] == token and r["path"] == f"/hook/{path_secret}" for r in received)
    sent = [o for r in received for o in json.loads(r["body"])["objects"]]
    assert sorted(o["object_id"] for o in sent) == sorted(objects)  # one record per object of the archive
    assert len(received) == -(-len(objects) // 15)
    for r in received:
        assert password.encode() not in r["raw"] and password not in json.dumps(r["headers"])
    for text in (proc.stdout, proc.stderr):
        assert password not in text and token not in text and path_secret not in text


def test_live_mode_refuses_the_workflow_before_kafka_is_touched(tmp_path):
    """Live mode plans the workflow before it connects: a Kafka variable in a webhook is exit 2 naming
    it and its line, not a stream that starts (here towards a port nobody listens on)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = _webhook_workflow({"url": "http://127.0.0.1:9/x", "headers_from_env": {"X-Leak": "AMPEL_DASK_KAFKA_SASL_PASSWORD"}})
    path = tmp_path / "wf.yml"
    path.write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in PROXIES} | {"AMPEL_DASK_KAFKA_SASL_PASSWORD": "kafka-pw-7f3a", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "ampel_dask.cli", "live", str(path), "--bootstrap", f"127.0.0.1:{port}", "--topic", "t",
                           "--archive", str(tmp_path / "archive"), "--store", str(tmp_path / "store"), "--workers", "0", "--until-idle"],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "AMPEL_DASK_KAFKA_SASL_PASSWORD" in ln)
    assert proc.returncode == 2, proc.stderr
    assert f"wf.yml:{line}: channels[0] (ALL).t3[0].config.headers_from_env.X-Leak: Value error, environment variable 'AMPEL_DASK_KAFKA_SASL_PASSWORD'" in proc.stderr, proc.stderr
    assert "kafka-pw-7f3a" not in proc.stdout + proc.stderr


def test_units_listing_shows_variable_fields_as_plain_strings():
    from ampel_dask.tiers.registry import describe

    fields = describe("T3Webhook", T3Webhook)["config"]
    assert fields["url_env"] == "str | None" and fields["headers_from_env"] == "dict[str, str]"
