"""The `prepare` stage flow: corpora, vocabulary and Parquet sequence shards.

With no inputs given it uses the latest outputs of both ingest stages; an input may
also be a fingerprint or an output directory.

The work fans out: a subflow, `prepare-parts`, maps one task per corpus part (counting,
then shard writing; tasks.data explains the steps) on the task runner that
`prepare.task_runner` names: threads of this process (`prepare.max_workers` of them;
default one per core), or a Dask cluster (`prefect-dask`): a local one started for the
run, or the scheduler at `prepare.dask_address`. Prefect sets a flow's task runner when
it is decorated, so the subflow is given its runner per run (`flow.with_options`). The
output is the same, byte for byte, whatever the runner, the workers and the part size.

    homer stage prepare --set prepare.seq_len=50
    homer stage prepare --set prepare.task_runner=dask --set prepare.dask_address=tcp://scheduler:8786
"""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from flows.config import StartFrom, stage_config
from flows.naming import run_namer
from model.data.prepare import PrepareConfig, PrepareError
from model.store.outputs import StageRef, data_root, output_complete, remote_of, root_name, resolve
from tasks.common import flatten, publish_counts, run_stage_task, stage_fingerprint, verify_inputs
from tasks.data import prepare_task, write_prepare


def task_runner_for(config: PrepareConfig):
    """The task runner prepare.task_runner names; prefect-dask is imported only for Dask."""
    if config.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:
            raise PrepareError(f"prepare.task_runner=dask needs prefect-dask, which is not installed ({exc}): "
                               f"pip install 'recurrent-homer[dask]', or set prepare.task_runner=threads") from None
        if config.dask_address:
            return DaskTaskRunner(address=config.dask_address)
        workers = {"n_workers": config.max_workers, "threads_per_worker": 1} if config.max_workers else {}
        return DaskTaskRunner(cluster_kwargs=workers)
    return ThreadPoolTaskRunner(max_workers=config.max_workers or os.cpu_count() or 1)


class _Mapped:
    """write_prepare's runner inside a flow: `task.map` on the flow's task runner.

    A failure is raised only once every task started so far has stopped, so none is still
    writing into the staging directory when it is removed.
    """

    def __init__(self) -> None:
        self.started: list = []

    def map(self, task_, *mapped: list, **fixed: Any) -> list:
        futures = task_.map(*mapped, **{name: unmapped(value) for name, value in fixed.items()})
        self.started.extend(futures)
        return futures

    def call(self, task_, *args: Any, **kwargs: Any) -> Any:
        return task_(*args, **kwargs)

    def gather(self, futures: list) -> list:
        wait(futures)
        if not all(f.state.is_completed() for f in futures):
            self.settle()
        return [f.result() for f in futures]

    def settle(self) -> None:
        wait(self.started)


@flow(name="prepare-parts", flow_run_name=run_namer("prepare-parts", {"runner": "config.task_runner", "at": "config.dask_address"}))
def prepare_parts(config: PrepareConfig, inputs: dict[str, StageRef], root: str, fingerprint: str) -> StageRef:
    """Write the prepare output `fingerprint` with one task per corpus part (run with the task runner of prepare.task_runner)."""
    root_path = data_root(root)
    # Workers of a Dask cluster elsewhere cannot write into this machine's staging directory: with an artifact root in an
    # object store they write into a folder there, copied back here before the output is published.
    in_store = config.task_runner == "dask" and bool(config.dask_address) and remote_of(root_path) is not None
    if config.task_runner == "dask" and config.dask_address and not in_store:
        get_run_logger().warning("prepare.dask_address is set but the artifact root %s is a local path: the Dask workers must "
                                 "see it at the same path (a shared file system); else put the root in an object store "
                                 "(HOMER_DATA_DIR=s3://...)", root_path)
    return write_prepare(config, inputs, root_path, fingerprint, _Mapped(), work_in_store=in_store)


@flow(name="prepare", flow_run_name=run_namer("prepare", {"from": "start_from", "seq_len": "config.seq_len", "val": "config.val_fraction"}))
def prepare(
    config: PrepareConfig = PrepareConfig(),
    wikipedia: StageRef | str | None = None,
    simpsons: StageRef | str | None = None,
    data_dir: str | None = None,
    start_from: StartFrom = "latest",
) -> StageRef:
    """Build corpora, the vocabulary (prepare.tokenizer: char, word or bpe) and train/val/test shards from the ingested data.

    Args:
        config: sequence length, validation split, tokenizer, vocabulary and shard settings; where the parts run (task_runner, max_workers, dask_address)
        wikipedia: ingest-wikipedia output (fingerprint or directory); empty = the latest
        simpsons: ingest-simpsons output (fingerprint or directory); empty = the latest
        data_dir: artifact root (default: $HOMER_DATA_DIR or ./data)
        start_from: latest = the config of this stage's latest output, changing only the fields given; config = as given
    """
    root = data_root(data_dir)
    config, origin = stage_config(root, "prepare", config, start_from)
    get_run_logger().info("config: started from %s", origin)
    inputs = {"wikipedia": resolve(root, "ingest-wikipedia", wikipedia), "simpsons": resolve(root, "ingest-simpsons", simpsons)}
    fp = stage_fingerprint("prepare", config, inputs)
    if not output_complete(root, "prepare", fp):  # missing or damaged (a damaged one is set aside when the new one is published)
        verify_inputs(inputs)  # checksums, before any part reads them
        prepare_parts.with_options(task_runner=task_runner_for(config))(config, inputs, root_name(root), fp)
    # The stage task: Cached on a re-run; here it finds the output the parts wrote (and sets latest).
    ref = run_stage_task(prepare_task, "prepare", config, inputs, root_name(root))
    counts = ref.manifest()["counts"]
    publish_counts("prepare", ref, flatten(counts), "vocabulary size, out-of-vocabulary rates, documents and windows per split")
    return ref
