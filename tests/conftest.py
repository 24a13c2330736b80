"""Shared test set-up: a temporary PREFECT_HOME and HF cache, one Prefect test harness.

The environment is set at import time, before any test module imports prefect, so
every Prefect setting resolves inside the temporary home.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="homer-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_TO_API_BATCH_INTERVAL"] = "0.3"
os.environ["HF_HOME"] = str(_SESSION_HOME / "hf")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["KAGGLEHUB_CACHE"] = str(_SESSION_HOME / "kagglehub")
# Trainings count each other to share the cores (model/training/threads.py): only this session's count here,
# so another process on the machine cannot change a test's thread count (and its floating-point results).
os.environ["HOMER_TRAINING_REGISTRY"] = str(_SESSION_HOME / "trainings")
os.environ.pop("HOMER_DATA_DIR", None)
os.environ["HOMER_CACHE_DIR"] = str(_SESSION_HOME / "cache")  # store mirrors and the shards' .npy copies
# The session's test server runs no lease reaper, so a killed run's lease would never come free: host locks only
# (the end-to-end tests run `prefect server start`, which has one, and use the leases).
os.environ["HOMER_OUTPUT_LOCK"] = "host"
logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's S3 server logs every request at INFO

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (flow and task tests use it)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """A fresh artifact root, also exported as HOMER_DATA_DIR."""
    root = tmp_path / "data"
    monkeypatch.setenv("HOMER_DATA_DIR", str(root))
    return root


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


SMALL_CSV = (
    "raw_character_text,spoken_words\n"
    "Marge Simpson,\"Homer, did you eat all the doughnuts?\"\n"
    "Homer Simpson,\"Marge, I said \"\"no more\"\" and I meant it.\"\n"
    ",\n"
    "Homer Simpson,\n"
    "Bart Simpson,Eat my shorts.\n"
    "Homer Simpson,   Mmm...   doughnuts.  \n"
    "Young Homer,I'll be a rock star!\n"
    "Homer Simpson,Iâ€™m not fat â€¦ I'm big-boned.\n"
)


@pytest.fixture
def small_csv(tmp_path) -> Path:
    return write_csv(tmp_path / "simpsons_dataset.csv", SMALL_CSV)



@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API: moto's server on a free loopback port, a bucket, and AWS_* set to reach it.

    Yields SimpleNamespace(endpoint, bucket, secret). AWS_ENDPOINT_URL, fake credentials and
    AWS_DEFAULT_REGION stay set (and ~/.aws unread) until the session ends; then the server stops.
    """
    import socket
    import uuid
    from types import SimpleNamespace

    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    secret = f"homer-fake-secret-{uuid.uuid4().hex}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3"):
            env.delenv(name, raising=False)
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        env.setenv("AWS_ACCESS_KEY_ID", "homer-fake-key-id")
        env.setenv("AWS_SECRET_ACCESS_KEY", secret)
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_CONFIG_FILE", str(_SESSION_HOME / "aws-config-none"))
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(_SESSION_HOME / "aws-credentials-none"))
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        bucket = "homer-test"
        boto3.client("s3").create_bucket(Bucket=bucket)
        try:
            yield SimpleNamespace(endpoint=endpoint, bucket=bucket, secret=secret)
        finally:
            server.stop()
