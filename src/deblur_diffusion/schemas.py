"""The entry points' own settings as structured configs: Hydra checks every value's type and choice
when it composes the config (``test=maybe``, ``evaluate_checkpoint=bets``, ``precision=fp8`` fail
there, naming the key), before any model is built or any data read.

Each entry point's YAML file starts from its schema (``defaults: [schema/<entry point>, _self_]``).
The config groups (``data``, ``model``, ``trainer``...) are typed by the classes they build, not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# The choices of the entry points' settings (each value is its name).
Precision = StrEnum("Precision", ["fp32", "bf16", "fp16"])
Backend = StrEnum("Backend", ["auto", "torch", "onnxruntime"])
EvaluatedWeights = StrEnum("EvaluatedWeights", ["last", "best"])
EvaluatedSplit = StrEnum("EvaluatedSplit", ["test", "val"])
ExportFormat = StrEnum("ExportFormat", ["safetensors", "official", "onnx"])
PriorKind = StrEnum("PriorKind", ["auto", "official", "paper_decoder"])
SynthesizedLayout = StrEnum("SynthesizedLayout", ["flat", "scenes"])
StoreEncoding = StrEnum("StoreEncoding", ["raw", "png"])


@dataclass
class _Groups:
    """The config groups an entry point composes (typed by the classes they build)."""

    data: Any = None
    model: Any = None
    paths: Any = None
    inference: Any = None


@dataclass
class _Presets:
    """What an experiment preset sets besides its groups."""

    task_name: str = "run"
    # The diffusion steps of the priors a swintormer_dpdd_prior run reads.
    prior_steps: int | None = None
    trainer: Any = None


@dataclass
class TrainSettings(_Groups, _Presets):
    seed: int = 42
    ckpt_path: str | None = None
    test: bool = True
    evaluate_checkpoint: EvaluatedWeights = EvaluatedWeights.last
    report: bool = False
    optimized_metric: str | None = "val/psnr"
    logger: Any = None
    callbacks: Any = None
    # The values an Optuna search sweeps besides the model's (hparams_search=regression).
    sweep: Any = None


@dataclass
class _Restoring(_Groups):
    """What the entry points that restore with trained weights share."""

    ckpt: Any = MISSING
    ckpt_sha256: str | None = None
    architecture: Any = field(default_factory=dict)
    ema: bool = True
    seed: int = 0
    device: str = "auto"
    precision: Precision = Precision.fp32
    backend: Backend = Backend.auto


@dataclass
class EvaluateSettings(_Restoring, _Presets):
    backend: Backend = Backend.torch
    split: EvaluatedSplit = EvaluatedSplit.test
    protocol: str = "auto"
    score_with_ground_truth_prior: bool = False
    save_images: bool = False
    report: bool = True
    wandb: Any = None
    lpips: bool = True
    compare_to: str | None = None
    output_dir: str = MISSING


@dataclass
class PredictSettings(_Restoring):
    input: str = MISSING
    output: str = MISSING
    split: str | None = None
    views: Any = "auto"
    jpeg_quality: int = 95
    prior: Any = None
    max_pixels: Any = "auto"


@dataclass
class AppSettings(_Restoring):
    host: str = "127.0.0.1"
    port: int = 7860
    views: Any = "auto"
    jpeg_quality: int = 95
    prior: Any = None
    max_pixels: Any = "auto"


@dataclass
class ExportSettings(_Restoring):
    out: str = MISSING
    format: ExportFormat = ExportFormat.safetensors


@dataclass
class GeneratePriorSettings(_Groups):
    ckpt: str = MISSING
    ckpt_sha256: str | None = None
    ldm_config: str | None = None
    prior: PriorKind = PriorKind.auto
    out: str = MISSING
    split: str = "train"
    input: str | None = None
    steps: int = 50
    seed: int | None = None
    batch_size: int = 4
    tile_above_pixels: int = 1048576
    device: str = "auto"


@dataclass
class SummarySettings(_Groups, _Presets):
    height: int = 256
    width: int = 256
    batch_size: int = 1
    seed: int = 42


@dataclass
class SynthesizeSettings:
    out: str = MISSING
    train_pairs: int = 16
    test_pairs: int = 4
    image_size: int = 128
    kernel_size: int = 15
    kernel_kinds: list[str] = field(default_factory=lambda: ["defocus", "motion", "gaussian"])
    noise_sigma_max: float = 0.0
    bit_depth: int = 8
    layout: SynthesizedLayout = SynthesizedLayout.flat
    pairs_per_scene: int = 4
    seed: int = 0


@dataclass
class PrepareSettings(_Groups):
    out: str = MISSING
    split: str = "train"
    encoding: StoreEncoding = StoreEncoding.raw
    overwrite: bool = False
    seed: int = 0


SCHEMAS = {
    "train": TrainSettings,
    "evaluate": EvaluateSettings,
    "predict": PredictSettings,
    "app": AppSettings,
    "export": ExportSettings,
    "generate_prior": GeneratePriorSettings,
    "summary": SummarySettings,
    "synthesize": SynthesizeSettings,
    "prepare": PrepareSettings,
}


def register_schemas() -> None:
    """Makes ``schema/<entry point>`` known to Hydra (done when the package's CLI module loads)."""
    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(group="schema", name=name, node=schema)
