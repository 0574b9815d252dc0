"""The environment variables a workflow may read: only those an operator set for it.

A unit config may name environment variables for secrets it needs (T3Webhook's ``url_env`` and
``headers_from_env``: a webhook URL, an API key), so the secret stays out of the workflow file. A
workflow file may come from anyone, and what it names leaves the machine in the request it configures:
naming ``AMPEL_DASK_KAFKA_SASL_PASSWORD`` would send the broker password to any URL. So a workflow may
read only variables named ``AMPEL_DASK_SECRET_<NAME>``, which an operator sets for workflows; any other
name (the Kafka credentials, a cloud token, ``HOME``) fails the unit's config when the workflow is
planned, and is checked again where the value is read. Every unit that reads the environment for its
config does so through :func:`read_variable`, and types such fields :data:`WorkflowVariable`.
"""

from __future__ import annotations

import os
import re
from typing import Annotated

from pydantic import AfterValidator

from ..io.kafka_auth import ENV_PREFIX as KAFKA_PREFIX
from .base import shown

SECRET_PREFIX = "AMPEL_DASK_SECRET_"
_NAME = re.compile(rf"{SECRET_PREFIX}[A-Z0-9_]{{1,100}}\Z")


def workflow_variable(name: str) -> str:
    """``name`` when a workflow may read it; else a ValueError naming it (never its value)."""
    if not (isinstance(name, str) and _NAME.match(name)):
        what = " (a Kafka credential)" if str(name).startswith(KAFKA_PREFIX) else ""
        raise ValueError(
            f"environment variable {shown(name)}{what} is not readable by a workflow: only {SECRET_PREFIX}<NAME> "
            "variables are (capitals, digits, '_'; set by the operator for workflows)"
        )
    return name


WorkflowVariable = Annotated[str, AfterValidator(workflow_variable)]
"""A config field naming an environment variable: refused at validation unless a workflow may read it."""


def read_variable(name: str) -> str | None:
    """The value of the variable a workflow names (None when unset), after the same check."""
    return os.environ.get(workflow_variable(name))


__all__ = ["SECRET_PREFIX", "WorkflowVariable", "read_variable", "workflow_variable"]
