"""The `generate` flow: samples from a checkpoint, written as a markdown artifact.

    homer generate --checkpoint latest --prompt "Marge, " --num-samples 3   # no Prefect needed
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.config import GenerateConfig
from flows.naming import run_namer
from model.network.checkpoint import choose_model, describe_model, load_model_from_checkpoint, model_checkpoint
from model.generation.sampling import generate
from model.store.outputs import data_root
from tasks.common import artifact_key


def sample(config: GenerateConfig, root: Path) -> tuple[str, list[str]]:
    """(which checkpoint was used and why, e.g. '<root>/finetune/<fp>/best (finetune/latest)', the samples)."""
    ref, why = choose_model(root, config.checkpoint)
    model, vocab, _ = load_model_from_checkpoint(model_checkpoint(ref))
    texts = generate(model, vocab, prompt=config.prompt, length=config.length, num_samples=config.num_samples,
                     temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, greedy=config.greedy,
                     beam_width=config.beam_width, seed=config.seed)
    return describe_model(ref, why), texts


def samples_markdown(path: Path | str, config: GenerateConfig, texts: list[str]) -> str:
    head = (f"# Samples from `{path}`\n\nprompt {config.prompt!r}, temperature {config.temperature}, top-k {config.top_k}, "
            f"top-p {config.top_p}, greedy {config.greedy}, beam {config.beam_width}, seed {config.seed}\n")
    return head + "".join(f"\n## Sample {i + 1}\n\n```\n{t}\n```\n" for i, t in enumerate(texts))


@flow(name="generate", flow_run_name=run_namer("generate", {"checkpoint": "config.checkpoint", "n": "config.num_samples",
                                                            "t": "config.temperature"}))
def generate_flow(config: GenerateConfig = GenerateConfig(), data_dir: str | None = None) -> list[str]:
    """Generate samples from a checkpoint and publish them as a markdown artifact.

    Args:
        config: the checkpoint, the prompt and the sampling settings
        data_dir: artifact root (default: $HOMER_DATA_DIR or ./data)
    """
    path, texts = sample(config, data_root(data_dir))
    create_markdown_artifact(key=artifact_key("generated", "samples"), markdown=samples_markdown(path, config, texts),
                             description=f"{len(texts)} samples from {path}")
    return texts
