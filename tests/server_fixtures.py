"""Real servers for integration tests: a Kafka-protocol broker and a MongoDB-wire-protocol server.

Both run as processes of their own for the whole test session (see ``ampel_dask.testing``):

- ``kafka``: librdkafka's mock cluster (``.bootstrap``), with the topics in ``KAFKA_TOPICS``;
  ``new_topic(partitions=2)`` gives a test a fresh topic of its own.
- ``mongo``: SecantusDB on a free loopback port (``.uri``), data in a session temp dir;
  ``mongo_db`` gives a test a fresh database of its own.

Use them from a test module with ``from tests.server_fixtures import kafka, new_topic  # noqa: F401``
(or ``pytest_plugins = ["tests.server_fixtures"]`` in the top-level conftest).

A package a server needs (confluent-kafka; secantusdb and pymongo) that is missing fails the test under
``CI`` and skips it elsewhere. A server that is installed but does not start is an error everywhere.
Teardown checks that each server's process is gone and its port closed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import uuid

import pytest

#: topics the session broker starts with: {name: partitions}
KAFKA_TOPICS = {"alerts": 2, "alerts-1p": 1}


def require(module: str, install: str) -> None:
    """Skip (or, under CI, fail) the test when ``module`` cannot be imported."""
    if importlib.util.find_spec(module) is not None:
        return
    reason = f"{module} is not installed (pip install {install!r}); needed for a real test server"
    if os.environ.get("CI"):
        pytest.fail(reason + " -- required in CI")
    pytest.skip(reason)


def process_gone(pid: int) -> bool:
    """No process with this PID (an exited child that was waited for is gone, not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def port_closed(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=1.0):
            return False
    except OSError:
        return True


def host_ports(addresses: str) -> list[tuple[str, int]]:
    """'h:p,h:p' or 'mongodb://h:p/' -> [(h, p), ...]"""
    addresses = re.sub(r"^mongodb://|/.*$", "", addresses)
    out = []
    for hp in addresses.split(","):
        host, _, port = hp.rpartition(":")
        out.append((host, int(port)))
    return out


def assert_stopped(server, addresses: str) -> None:
    """``server`` was stopped: its process exited and was reaped, its ports refuse connections."""
    assert server.proc.poll() is not None, f"{server!r} still running after stop()"
    assert process_gone(server.pid), f"process {server.pid} of {server!r} still exists"
    for host, port in host_ports(addresses):
        assert port_closed(host, port), f"{host}:{port} still accepts connections after {server!r} stopped"


# --------------------------------------------------------------------------------------------------
# Kafka
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kafka(tmp_path_factory):
    """A Kafka-protocol broker for the session: ``.bootstrap``, ``.create_topic(name, partitions)``."""
    require("confluent_kafka", "confluent-kafka")
    from ampel_dask.testing.kafka_broker import start_kafka

    log = tmp_path_factory.mktemp("kafka") / "broker.log"
    server = start_kafka(KAFKA_TOPICS, log_path=log)
    yield server
    code = server.stop()
    assert code == 0, f"kafka broker exited with {code}; log {log}"
    assert_stopped(server, server.bootstrap)


@pytest.fixture
def new_topic(kafka, request):
    """``new_topic(partitions=2) -> name``: a topic no other test uses, created on the session broker."""

    def make(partitions: int = 2) -> str:
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)[:80].strip("-") or "topic"
        return kafka.create_topic(f"{base}-{uuid.uuid4().hex[:8]}", partitions)

    return make


# --------------------------------------------------------------------------------------------------
# MongoDB wire protocol
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mongo(tmp_path_factory):
    """A MongoDB-wire-protocol server (SecantusDB) for the session: ``.uri``."""
    require("pymongo", "pymongo")
    require("secantus", "secantusdb==0.7.0b3")
    from ampel_dask.testing.mongo_server import start_mongo

    server = start_mongo(tmp_path_factory.mktemp("mongo"))
    yield server
    code = server.stop()
    assert code == 0, f"SecantusDB exited with {code}; log {server.log_path}"
    assert_stopped(server, server.uri)


@pytest.fixture
def mongo_db(mongo):
    """A fresh database on the session server (a pymongo ``Database``), dropped afterwards."""
    from pymongo import MongoClient

    client = MongoClient(mongo.uri, serverSelectionTimeoutMS=10_000)
    name = f"test_{uuid.uuid4().hex[:12]}"
    yield client[name]
    client.drop_database(name)
    client.close()
