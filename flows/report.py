"""The `report` stage flow, last in the DAG: held-out bits per character, samples, loss curves.

Scores the fine-tuned model and the pretrained model it started from on the test and
validation splits of both corpora of the data it was fine-tuned on, so the effect of
fine-tuning on the character's text is visible, and writes `report.md` (with `loss.png`)
into its output directory and as Prefect artifacts. Which models and data belong
together is read from the fine-tune output's manifest; an explicit input that
contradicts it is refused.

    homer stage report
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.config import ReportConfig, StartFrom, stage_config
from flows.naming import run_namer
from model.store.outputs import StageRef, StoreError, data_root, root_name, read_manifest, resolve
from tasks.artifacts import png_markdown
from tasks.common import artifact_key, run_stage_task
from tasks.train import report_task


def belonging_inputs(root, finetune: StageRef, prepare: StageRef | str | None, pretrain: StageRef | str | None) -> dict[str, StageRef]:
    """The fine-tune output, the model it started from and the data it was fine-tuned on.

    Read from the fine-tune output's manifest; an explicit `prepare` or `pretrain` must be
    the same output, else a StoreError says which and what to do.
    """
    recorded = finetune.manifest()["inputs"]
    own_prepare, own_start = StageRef.model_validate(recorded["prepare"]), StageRef.model_validate(recorded["init"])
    start = resolve(root, "pretrain", own_start.fingerprint) if own_start.stage == "pretrain" else own_start
    data = resolve(root, "prepare", own_prepare.fingerprint)
    problems = []
    if prepare not in (None, "") and (given := resolve(root, "prepare", prepare)).fingerprint != data.fingerprint:
        problems.append(f"prepare={given.fingerprint}, but finetune {finetune.fingerprint} was fine-tuned on prepare {data.fingerprint}")
    if pretrain not in (None, "") and (given := resolve(root, "pretrain", pretrain)).fingerprint != start.fingerprint:
        problems.append(f"pretrain={given.fingerprint}, but finetune {finetune.fingerprint} started from "
                        f"{start.stage} {start.fingerprint} ({start.path})")
    if problems:
        raise StoreError("report: the inputs do not belong together: " + "; ".join(problems)
                         + ". Leave prepare and pretrain empty (they are read from the finetune output's manifest), "
                           "or pass the finetune output that was trained from them.")
    return {"prepare": data, "pretrain": start, "finetune": finetune}


@flow(name="report", flow_run_name=run_namer("report", {"from": "start_from", "temperatures": "config.temperatures"}))
def report(config: ReportConfig = ReportConfig(), prepare: StageRef | str | None = None, pretrain: StageRef | str | None = None,
           finetune: StageRef | str | None = None, data_dir: str | None = None,
        start_from: StartFrom = "latest") -> StageRef:
    """Evaluate both checkpoints on held-out text and sample from the fine-tuned one.

    Args:
        config: sampling settings of the report
        prepare: prepare output; empty = the one the fine-tuned model was trained on (must match if given)
        pretrain: pretrain output; empty = the one the fine-tuned model started from (must match if given)
        finetune: finetune output (fingerprint or directory); empty = the latest
        data_dir: artifact root (default: $HOMER_DATA_DIR or ./data)
        start_from: latest = the config of this stage's latest output, changing only the fields given; config = as given
    """
    root = data_root(data_dir)
    config, origin = stage_config(root, "report", config, start_from)
    get_run_logger().info("config: started from %s", origin)
    inputs = belonging_inputs(root, resolve(root, "finetune", finetune), prepare, pretrain)
    ref = run_stage_task(report_task, "report", config, inputs, root_name(root))
    # The UI cannot show a relative image (nor a file:// one): the artifacts carry the PNG itself.
    image = png_markdown(ref.dir / "loss.png", "loss curves")
    markdown = (ref.dir / "report.md").read_text(encoding="utf-8").replace("![loss curves](loss.png)", image)
    create_markdown_artifact(key=artifact_key("report"), markdown=markdown,
                             description="held-out bits per character, samples and loss curves")
    metrics = read_manifest(ref.dir)["metrics"]
    create_table_artifact(key=artifact_key("report", "bpc"), table=[{"metric": k, "bits_per_char": v} for k, v in metrics.items()],
                          description="bits per character: test (never read in training) and validation splits")
    create_markdown_artifact(key=artifact_key("loss", "curves"), markdown=f"### Loss curves\n\n{image}\n",
                             description="training and validation loss (nats/char) of both training stages against step")
    return ref
