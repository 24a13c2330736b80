"""The `report` stage flow, last in the DAG: held-out bits per character, samples, loss curves.

Scores the pretrained and the fine-tuned model on both validation splits, so the effect
of fine-tuning on the character's text is visible, and writes `report.md` (with
`loss.png`) into its output directory and as Prefect artifacts.

    homer stage report
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from flows.config import ReportConfig
from flows.naming import run_namer
from model.store import StageRef, data_root, read_manifest, resolve
from tasks.common import artifact_key, run_stage_task
from tasks.train import report_task


@flow(name="report", flow_run_name=run_namer("report", {"temperatures": "config.temperatures"}))
def report(config: ReportConfig = ReportConfig(), prepare: StageRef | str | None = None, pretrain: StageRef | str | None = None,
           finetune: StageRef | str | None = None, data_dir: str | None = None) -> StageRef:
    """Evaluate both checkpoints on held-out text and sample from the fine-tuned one.

    Args:
        config: sampling settings of the report
        prepare: prepare output (fingerprint or directory); empty = the latest
        pretrain: pretrain output (fingerprint or directory); empty = the latest
        finetune: finetune output (fingerprint or directory); empty = the latest
        data_dir: artifact root (default: $HOMER_DATA_DIR or ./data)
    """
    root = data_root(data_dir)
    inputs = {"prepare": resolve(root, "prepare", prepare), "pretrain": resolve(root, "pretrain", pretrain),
              "finetune": resolve(root, "finetune", finetune)}
    ref = run_stage_task(report_task, "report", config, inputs, str(root))
    # The UI cannot show a relative image: the artifact links the PNG in the output directory instead.
    markdown = (ref.dir / "report.md").read_text(encoding="utf-8").replace(
        "![loss curves](loss.png)", f"[loss curves (PNG)]({(ref.dir / 'loss.png').as_uri()})")
    create_markdown_artifact(key=artifact_key("report"), markdown=markdown, description="held-out bits per character and samples")
    metrics = read_manifest(ref.dir)["metrics"]
    create_table_artifact(key=artifact_key("report", "bpc"), table=[{"metric": k, "bits_per_char": v} for k, v in metrics.items()],
                          description="bits per character on the validation splits")
    create_link_artifact(key=artifact_key("loss", "curves"), link=(ref.dir / "loss.png").as_uri(), link_text="loss curves (PNG)")
    return ref
