"""The artifact root on an object store against the local disk: prepare, and one training epoch.

Starts moto's S3 server on a loopback port and a temporary Prefect server, then runs the
real stage flows on the bundled sample data twice, side by side in one run: once with the
root on the local disk, once with `HOMER_DATA_DIR=s3://...` (files to the bucket, manifest
last; training pushes last/ and best/ at each checkpoint). A third row reads the prepare
output into an empty cache, as a second machine would. Prints a markdown table of seconds.

    PYTHONPATH=. python benchmarks/bench_store.py           # about 2 minutes on 2 cores
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-store-"))
    port = free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    s3.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", PREFECT_HOME=str(work / "prefect"), HOMER_CACHE_DIR=str(work / "cache"))
    boto3.client("s3").create_bucket(Bucket="homer-bench")

    from flows.config import load_config
    from flows.ingest_simpsons import ingest_simpsons
    from flows.ingest_wikipedia import ingest_wikipedia
    from flows.local_server import temporary_server
    from flows.prepare import prepare
    from flows.pretrain import pretrain
    from model.store.outputs import data_root, output_dir

    cfg = load_config("sample", None, ["pretrain.train.epochs=1", "pretrain.train.checkpoint_every_steps=50"])
    roots = {"local disk": str(work / "data"), "S3 (moto, loopback)": f"s3://homer-bench/{uuid.uuid4().hex[:8]}"}
    rows = []
    with temporary_server():
        for name, root in roots.items():
            ingest_wikipedia(cfg.wikipedia, data_dir=root, start_from="config")
            ingest_simpsons(cfg.simpsons, data_dir=root, start_from="config")
            started = time.perf_counter()
            ref = prepare(cfg.prepare, data_dir=root, start_from="config")
            prepared = time.perf_counter() - started
            started = time.perf_counter()
            trained = pretrain(cfg.pretrain, data_dir=root, start_from="config")
            training = time.perf_counter() - started
            size = sum(p.stat().st_size for p in ref.dir.rglob("*") if p.is_file())
            ckpt = sum(p.stat().st_size for p in (trained.dir / "last").rglob("*") if p.is_file())
            rows.append((name, prepared, training, size, ckpt))
        remote = roots["S3 (moto, loopback)"]
        os.environ["HOMER_CACHE_DIR"] = str(work / "empty-cache")
        from model.store import outputs

        outputs._MIRRORS.clear()
        started = time.perf_counter()
        fresh = outputs.StageRef(stage="prepare", fingerprint=ref.fingerprint, path=f"{remote}/prepare/{ref.fingerprint}").dir
        download = time.perf_counter() - started
        assert output_dir(data_root(remote), "prepare", ref.fingerprint) == fresh
    s3.stop()

    print(f"| root | prepare (s) | pretrain, 1 epoch (s) | prepare output | last/ checkpoint |")
    print("| --- | --- | --- | --- | --- |")
    for name, prepared, training, size, ckpt in rows:
        print(f"| {name} | {prepared:.2f} | {training:.2f} | {size / 1e6:.1f} MB | {ckpt / 1e6:.1f} MB |")
    print(f"\nReading the prepare output into an empty cache (a second machine): {download:.2f} s")


if __name__ == "__main__":
    main()
