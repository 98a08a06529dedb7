"""The linear score estimator: score = w . f over the L*H head features; stored as safetensors + config.json.

Estimator folders are untrusted input (downloaded from the Hub, shared by others): config.json is validated with
strict pydantic models and the weight tensor's name, dtype, shape and values are checked, so a malformed file
fails with an EstimatorFormatError naming the file and the field instead of crashing or loading silently wrong.
save_pretrained runs the same checks before writing, so whatever it writes loads back.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..capture.features import FEATURE_DEFINITION, FEATURE_VERSION
from ..errors import EstimatorFormatError, EstimatorMismatchError
from ..storage.reference_format import PUBLISHED_ESTIMATORS, ReferenceEstimator, read_reference_estimator
from ..storage.validation import describe_validation_error, describe_value
from .grounding import GroundednessCalibration

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
REFERENCE_NAME = "score_estimator.pt"
SHIPPED_PACKAGE = "at2_rag.estimators"
FORMAT_NAME: Literal["at2-rag-estimator"] = "at2-rag-estimator"
WEIGHTS_KEY = "weights"
# config.json holds a few numbers and an evaluation summary; anything near this size is not an estimator config
MAX_CONFIG_BYTES = 16 * 1024 * 1024
# safetensors dtype names of the floating-point types a weight vector may be stored in (it is read as float32)
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


# ---- validating untrusted estimator files ---------------------------------------------------------------


def _support_threshold(value: float) -> float:
    # +inf is what training writes when no positive score-to-log-odds scale was found ("never supported"), so a
    # file save_pretrained wrote may hold it; NaN and -inf would make every comparison meaningless.
    if math.isnan(value) or value == -math.inf:
        raise ValueError("must be a finite number (or Infinity: nothing is ever supported)")
    return value


class _Strict(BaseModel):
    """Strict types throughout: "false" is not False, 9.5 is not 9, "3" is not 3."""

    model_config = ConfigDict(strict=True, protected_namespaces=(), frozen=True)


class EvaluationColumn(_Strict):
    """One column of the card's evaluation table, as the evaluation's metric registry described it."""

    model_config = ConfigDict(extra="allow")
    key: str
    label: str
    digits: int = Field(default=3, ge=0, le=12)


class EvaluationRecord(_Strict):
    """`metadata.evaluation` as `at2-rag evaluate --record` writes it; the model card renders its summary rows
    under its `columns` (records written before columns were kept: the LDS / top-k / passes table)."""

    model_config = ConfigDict(extra="allow")
    summary: dict[str, dict[str, Any]] = Field(default_factory=dict)
    columns: list[EvaluationColumn] | None = None


# the card's columns for evaluation records that do not list their own (written before metrics were pluggable)
LEGACY_EVALUATION_COLUMNS = (
    ("lds", "LDS", 3),
    ("lds_dependent", "LDS, document-dependent sentences", 3),
    ("top1_drop", "top-1 log-prob drop", 2),
    ("top3_drop", "top-3 log-prob drop", 2),
    ("extra_forward_passes", "extra forward passes", 1),
)


class EstimatorMetadata(_Strict):
    """The metadata keys at2-rag reads back (the attributor's support threshold, the card's evaluation table);
    every other key is free-form JSON kept as it was written."""

    model_config = ConfigDict(extra="allow")
    support_threshold: Annotated[float, AfterValidator(_support_threshold)] = 0.0
    evaluation: EvaluationRecord | None = None


class EstimatorConfig(_Strict):
    """config.json of an estimator folder, exactly as `ScoreEstimator.config_dict()` writes it.

    Unknown keys are refused rather than ignored: a misspelt `trainedd: false` must not load as trained.
    Free-form information belongs in `metadata`.
    """

    model_config = ConfigDict(extra="forbid")
    format: Literal["at2-rag-estimator"] = FORMAT_NAME
    model_id: str | None = None
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    feature_version: int = FEATURE_VERSION
    feature_definition: str | None = None
    trained: bool = True
    metadata: EstimatorMetadata | None = None


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # json.loads would silently keep the last one
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_config(data: bytes, where: str) -> tuple[EstimatorConfig, dict[str, Any]]:
    """Validate config.json bytes; returns the typed config and the metadata dict as written (order and all)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EstimatorFormatError(f"{where} is not UTF-8 text ({exc})") from exc
    try:
        raw = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, duplicate keys, over-long integers, nesting
        raise EstimatorFormatError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise EstimatorFormatError(f"{where} must hold a JSON object, found {describe_value(raw)}")
    try:
        config = EstimatorConfig.model_validate(raw)
    except ValidationError as exc:
        raise EstimatorFormatError(describe_validation_error(exc, where)) from exc
    if config.feature_version != FEATURE_VERSION:
        raise EstimatorFormatError(
            f"{where}: field 'feature_version': the estimator uses feature version {config.feature_version}, "
            f"this at2-rag computes version {FEATURE_VERSION}"
        )
    return config, dict(raw.get("metadata") or {})


def read_config(path: Path) -> tuple[EstimatorConfig, dict[str, Any]]:
    """Read and validate an estimator's config.json (size-capped: the file is untrusted)."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise EstimatorFormatError(f"{path} is {size} bytes, far too large for an estimator config")
        data = path.read_bytes()
    except OSError as exc:
        raise EstimatorFormatError(f"cannot read {path}: {exc}") from exc
    return parse_config(data, str(path))


def read_weights(path: Path, num_layers: int, num_heads: int) -> torch.Tensor:
    """The float32 weight vector from model.safetensors, checked (name, dtype, shape, finiteness) before use."""
    n = num_layers * num_heads
    try:
        with safe_open(str(path), framework="pt") as f:
            names = sorted(f.keys())
            if names != [WEIGHTS_KEY]:
                raise EstimatorFormatError(
                    f"{path}: expected exactly one tensor named {WEIGHTS_KEY!r}, found {names or 'none'}"
                )
            handle = f.get_slice(WEIGHTS_KEY)
            dtype, shape = handle.get_dtype(), list(handle.get_shape())
            if dtype not in FLOAT_DTYPES:
                raise EstimatorFormatError(
                    f"{path}: tensor {WEIGHTS_KEY!r} has dtype {dtype}, "
                    f"expected a float type ({', '.join(FLOAT_DTYPES)})"
                )
            if shape not in ([n], [num_layers, num_heads]):
                raise EstimatorFormatError(
                    f"{path}: tensor {WEIGHTS_KEY!r} has shape {shape}, expected [{n}] or [{num_layers}, {num_heads}] "
                    f"(num_layers x num_heads = {num_layers} x {num_heads} in {CONFIG_NAME})"
                )
            weights = f.get_tensor(WEIGHTS_KEY)
    except EstimatorFormatError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:  # garbage, truncated, unreadable
        raise EstimatorFormatError(f"{path} is not a readable safetensors file: {exc}") from exc
    weights = weights.to(torch.float32).flatten()
    if not torch.isfinite(weights).all():
        bad = int((~torch.isfinite(weights)).sum())
        raise EstimatorFormatError(f"{path}: tensor {WEIGHTS_KEY!r} has {bad} NaN or infinite values")
    return weights


def _index(value: Any, name: str) -> int:
    """An integer argument (numpy / torch integers too), never a float silently truncated or a bool."""
    if isinstance(value, bool):
        raise EstimatorFormatError(f"{name} must be an integer, got {describe_value(value)}")
    try:
        return operator.index(value)
    except TypeError as exc:
        raise EstimatorFormatError(f"{name} must be an integer, got {describe_value(value)}") from exc


def model_slug(model_id: str) -> str:
    """Folder name of a shipped estimator: the model id's last part, lower-cased."""
    return model_id.rstrip("/").split("/")[-1].lower()


class ScoreEstimator(torch.nn.Module):
    """AT2's linear estimator. Construct from an explicit weight vector over the L*H heads (layer-major)."""

    def __init__(
        self,
        weights: torch.Tensor | list[float],
        num_layers: int,
        num_heads: int,
        model_id: str | None = None,
        trained: bool = True,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        weights = torch.as_tensor(weights, dtype=torch.float32).flatten()
        num_layers, num_heads = _index(num_layers, "num_layers"), _index(num_heads, "num_heads")
        if model_id is not None and not isinstance(model_id, str):
            raise EstimatorFormatError(f"model_id must be a string or None, got {describe_value(model_id)}")
        if not isinstance(trained, bool):
            raise EstimatorFormatError(f"trained must be True or False, got {describe_value(trained)}")
        if num_layers <= 0 or num_heads <= 0:
            raise EstimatorFormatError(f"num_layers and num_heads must be positive, got {num_layers}, {num_heads}")
        if weights.numel() != num_layers * num_heads:
            raise EstimatorFormatError(
                f"estimator has {weights.numel()} weights but num_layers x num_heads = "
                f"{num_layers} x {num_heads} = {num_layers * num_heads}"
            )
        if not torch.isfinite(weights).all():
            raise EstimatorFormatError("estimator weights contain NaN or infinity")
        self.weights = torch.nn.Parameter(weights.clone())
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.model_id = model_id
        self.trained = trained
        self.metadata = dict(metadata or {})

    # construction ---------------------------------------------------------------------------------------
    @classmethod
    def uniform(cls, num_layers: int, num_heads: int, model_id: str | None = None) -> ScoreEstimator:
        """Average attention over all heads: AT2's starting point and the untrained baseline."""
        n = num_layers * num_heads
        return cls(torch.full((n,), 1.0 / n), num_layers, num_heads, model_id=model_id, trained=False)

    @classmethod
    def single_head(cls, layer: int, head: int, num_layers: int, num_heads: int, **kw: Any) -> ScoreEstimator:
        """All weight on one head, to inspect what it attends to."""
        if not (0 <= layer < num_layers and 0 <= head < num_heads):
            raise EstimatorFormatError(f"head ({layer}, {head}) outside a {num_layers} x {num_heads} grid")
        w = torch.zeros(num_layers * num_heads)
        w[layer * num_heads + head] = 1.0
        return cls(w, num_layers, num_heads, trained=False, **kw)

    # scoring --------------------------------------------------------------------------------------------
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`[..., L*H]` features -> `[...]` scores."""
        if features.shape[-1] != self.weights.numel():
            raise EstimatorMismatchError(
                f"features have {features.shape[-1]} heads but the estimator expects {self.weights.numel()}"
            )
        return features.to(self.weights.dtype) @ self.weights

    def l1_normalize_(self) -> ScoreEstimator:
        with torch.no_grad():
            norm = self.weights.abs().sum()
            if norm > 0:
                self.weights.div_(norm)
        return self

    def check_compatible(self, num_layers: int, num_heads: int, model_id: str | None = None) -> None:
        """Refuse a model whose head grid (or id, when both are known) differs from the estimator's."""
        if (num_layers, num_heads) != (self.num_layers, self.num_heads):
            raise EstimatorMismatchError(
                f"estimator{f' for {self.model_id}' if self.model_id else ''} expects {self.num_layers} layers x "
                f"{self.num_heads} heads but the model has {num_layers} layers x {num_heads} heads"
            )
        if model_id and self.model_id and model_slug(model_id) != model_slug(self.model_id):
            raise EstimatorMismatchError(
                f"estimator was trained for {self.model_id!r} but the model is {model_id!r}; pass "
                "check_model_id=False to use it anyway"
            )

    def head_weights(self) -> torch.Tensor:
        """Weights as a [layers, heads] grid."""
        return self.weights.detach().reshape(self.num_layers, self.num_heads)

    # persistence ----------------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "model_id": self.model_id,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "feature_version": FEATURE_VERSION,
            "feature_definition": FEATURE_DEFINITION,
            "trained": self.trained,
            "metadata": self.metadata,
        }

    def save_pretrained(self, folder: str | os.PathLike[str]) -> Path:
        """Write model.safetensors, config.json and a model card atomically (a temp folder renamed into place)."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            config = self._config_json()
            save_file({WEIGHTS_KEY: self.weights.detach().contiguous().cpu()}, str(tmp / WEIGHTS_NAME))
            (tmp / CONFIG_NAME).write_text(config)
            (tmp / CARD_NAME).write_text(self.model_card())
            tmp.chmod(0o755)  # mkdtemp makes 0700: a saved estimator is meant to be shared
            for child in tmp.iterdir():
                child.chmod(0o644)
            if folder.exists():
                backup = folder.with_name(folder.name + ".old")
                shutil.rmtree(backup, ignore_errors=True)
                folder.rename(backup)
                tmp.rename(folder)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    def update_card(self, folder: str | os.PathLike[str]) -> None:
        """Rewrite config.json and README.md of a saved estimator (metadata changed, weights did not); other
        files in the folder, such as a training report, stay."""
        from ..storage.files import atomic_path

        folder = Path(folder)
        config = self._config_json()
        with atomic_path(folder / CONFIG_NAME) as tmp:
            tmp.write_text(config)
        with atomic_path(folder / CARD_NAME) as tmp:
            tmp.write_text(self.model_card())

    def _config_json(self) -> str:
        """config.json's text, checked with the loader's own rules first: whatever is saved must load back."""
        text = json.dumps(self.config_dict(), indent=2, default=str) + "\n"
        parse_config(text.encode("utf-8"), f"{CONFIG_NAME} about to be written")
        return text

    def model_card(self) -> str:
        meta = self.metadata
        lines = [
            "---",
            "library_name: at2-rag",
            "tags: [attribution, rag, at2]",
            *([f"base_model: {self.model_id}"] if self.model_id else []),
            "---",
            f"# AT2 score estimator{f' for {self.model_id}' if self.model_id else ''}",
            "",
            "A linear estimator over attention-head features (AT2, Cohen-Wang et al. 2025) that predicts the effect "
            "of removing each retrieved document on the model's answer. Load it with "
            "`at2_rag.ScoreEstimator.from_pretrained(...)`.",
            "",
            f"- Layers x heads: {self.num_layers} x {self.num_heads}",
            f"- Trained: {self.trained}",
            f"- Feature definition (v{FEATURE_VERSION}): {FEATURE_DEFINITION}",
        ]
        for key in ("training_data", "num_examples", "epochs", "heldout_correlation"):
            if meta.get(key) is not None:  # None: trained without held-out examples
                lines.append(f"- {key.replace('_', ' ').capitalize()}: {meta[key]}")
        evaluation = meta.get("evaluation")
        if isinstance(evaluation, dict) and isinstance(evaluation.get("summary"), dict):
            lines += ["", *evaluation_table(evaluation)]
        lines += _settings_lines(meta)
        return "\n".join(lines) + "\n"

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str]) -> ScoreEstimator:
        """Load config.json + model.safetensors (or a reference score_estimator.pt), validating both: the folder
        may come from anywhere (the Hub, a colleague), so every field is checked before it is used."""
        folder = Path(folder)
        if not folder.is_dir():
            raise EstimatorFormatError(f"{folder} is not a folder")
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        has_config, has_weights = config_path.is_file(), weights_path.is_file()
        if not (has_config and has_weights):
            if (folder / REFERENCE_NAME).is_file():
                return cls.from_reference(folder / REFERENCE_NAME)
            if has_config or has_weights:
                missing, present = (weights_path, CONFIG_NAME) if has_config else (config_path, WEIGHTS_NAME)
                raise EstimatorFormatError(f"{missing} is missing (the folder has {present} but needs both)")
            raise EstimatorFormatError(f"{folder} has no {CONFIG_NAME} + {WEIGHTS_NAME} (nor a {REFERENCE_NAME})")
        config, metadata = read_config(config_path)
        weights = read_weights(weights_path, config.num_layers, config.num_heads)
        # a groundedness head must match the heads (checked here, so a bad file fails when it is loaded)
        GroundednessCalibration.from_metadata(metadata, 1.0, num_features=weights.numel())
        return cls(
            weights,
            config.num_layers,
            config.num_heads,
            model_id=config.model_id,
            trained=config.trained,
            metadata=metadata,
        )

    @classmethod
    def from_reference(
        cls,
        path: str | os.PathLike[str],
        model_id: str | None = None,
        save_to: str | os.PathLike[str] | None = None,
    ) -> ScoreEstimator:
        """Load a reference-package `score_estimator.pt` (read without unpickling code; optionally saved in
        at2-rag's safetensors form)."""
        estimator = cls.from_reference_weights(read_reference_estimator(path))
        if model_id is not None:
            estimator.model_id = model_id
        if save_to is not None:
            estimator.save_pretrained(save_to)
        return estimator

    @classmethod
    def from_reference_weights(cls, ref: ReferenceEstimator) -> ScoreEstimator:
        """A ScoreEstimator from the checked contents of a reference estimator file."""
        return cls(ref.weights, ref.num_layers, ref.num_heads, model_id=ref.model_id, trained=True,
                   metadata=dict(ref.metadata))

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], **hub_kwargs: Any) -> ScoreEstimator:
        """Load from a folder, a reference-format `.pt` file, or a Hugging Face Hub repo id."""
        path = Path(name_or_path)
        if path.is_dir():
            return cls.from_folder(path)
        if path.is_file():
            return cls.from_reference(path)
        return cls._from_hub(str(name_or_path), **hub_kwargs)

    @classmethod
    def _from_hub(cls, repo_id: str, **hub_kwargs: Any) -> ScoreEstimator:
        from huggingface_hub import snapshot_download

        try:
            local = snapshot_download(
                repo_id, allow_patterns=[WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, REFERENCE_NAME], **hub_kwargs
            )
        except Exception as exc:
            raise EstimatorFormatError(
                f"{repo_id!r} is neither a local estimator folder/file nor a reachable Hub repo: {exc}"
            ) from exc
        estimator = cls.from_folder(local)
        if estimator.model_id is None:
            estimator.model_id = PUBLISHED_ESTIMATORS.get(repo_id)
        return estimator

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None, **kwargs: Any) -> str:
        """Upload the safetensors estimator folder to the Hub; returns the commit URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(Path(tmp) / "estimator")
            info = api.upload_folder(repo_id=repo_id, folder_path=str(Path(tmp) / "estimator"), **kwargs)
        return str(info)

    @classmethod
    def shipped(cls, model_id: str) -> ScoreEstimator | None:
        """The estimator bundled inside the package for `model_id`, if there is one."""
        root = resources.files(SHIPPED_PACKAGE) / model_slug(model_id)
        if not (root / CONFIG_NAME).is_file():
            return None
        with resources.as_file(root) as folder:
            return cls.from_folder(folder)

    def extra_repr(self) -> str:
        return f"layers={self.num_layers}, heads={self.num_heads}, model_id={self.model_id!r}, trained={self.trained}"


def _settings_lines(meta: dict[str, Any]) -> list[str]:
    """Card sections for the refinement prior, the groundedness calibration and the conversation evaluation."""
    lines: list[str] = []
    refinement = meta.get("refinement")
    if isinstance(refinement, dict):
        lines += ["", "## Refinement with `ablations=k`", ""]
        lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in refinement.items()]
    groundedness = meta.get("groundedness")
    if isinstance(groundedness, dict):
        lines += ["", "## Groundedness (`Citation.grounded`, nats)", ""]
        lines += [f"- {k.replace('_', ' ')}: {_card_value(v)}" for k, v in groundedness.items()]
    evaluated = meta.get("groundedness_evaluation")
    if isinstance(evaluated, dict) and evaluated:
        lines += ["", "## Groundedness evaluated (`at2-rag evaluate --groundedness`)", ""]
        lines += [
            "`grounded` against the label (the sentence's log-probability drops by >= 1 nat with every document "
            "masked out), per held-out set; standard errors from a bootstrap over examples. Measured is exact by "
            "construction; estimated is the zero-pass head above.",
            "",
            "| examples | sentences | measured AUROC | estimated AUROC | estimated precision | estimated recall |",
            "|---|---|---|---|---|---|",
        ]
        for name, row in evaluated.items():
            if isinstance(row, dict):
                cells = [_card_value(row.get(key)) for key in (
                    "measured_auroc", "estimated_auroc", "estimated_supported_precision", "estimated_supported_recall"
                )]
                lines.append(f"| {name} | {row.get('sentences')} | " + " | ".join(cells) + " |")
    conversations = meta.get("conversations")
    if isinstance(conversations, dict):
        lines += ["", "## Conversations (multi-turn held-out examples)", ""]
        lines += [
            f"- {k.replace('_', ' ')}: {_card_value(v)}"
            for k, v in conversations.items()
            if not isinstance(v, dict) or "mean" in v
        ]
    return lines


def _card_value(value: Any) -> str:
    """A metadata value as the model card shows it: a measurement as mean ± se, a weight list by its length."""
    if isinstance(value, list):
        return f"{len(value)} per-head weights"
    if isinstance(value, dict) and isinstance(value.get("mean"), (int, float)):
        se = value.get("se")
        se_text = f" ± {se:.3f}" if isinstance(se, (int, float)) and se == se else ""
        return f"{value['mean']:.3f}{se_text}"
    return str(value)


def evaluation_table(evaluation: dict[str, Any]) -> list[str]:
    """Markdown lines for an `at2-rag evaluate` summary recorded in an estimator's metadata."""
    summary = evaluation["summary"]

    def number(row: dict[str, Any], key: str, digits: int) -> str:
        value = row.get(key)
        if not isinstance(value, (int, float)) or value != value:  # missing or NaN
            return "n/a"
        sem = row.get(key + "_sem")
        spread = f" ± {sem:.{digits}f}" if isinstance(sem, (int, float)) and sem == sem else ""
        return f"{value:.{digits}f}{spread}"

    recorded = evaluation.get("columns")
    table = [
        (c["key"], str(c.get("label", c["key"])), min(max(c.get("digits", 3), 0), 12))
        for c in (recorded if isinstance(recorded, list) else [])
        if isinstance(c, dict) and isinstance(c.get("key"), str) and type(c.get("digits", 3)) is int
    ] or list(LEGACY_EVALUATION_COLUMNS)
    lines = [
        f"## Evaluation ({evaluation.get('num_examples', '?')} held-out examples"
        + (f", {evaluation['examples']}" if evaluation.get("examples") else "") + ")",
        "",
        "| method | " + " | ".join(label for _, label, _ in table) + " |",
        "|---|" + "---:|" * len(table),
    ]
    for name, row in summary.items():
        if not isinstance(row, dict):  # not a method's row (a hand-edited record): nothing to show
            continue
        lines.append(f"| {name} | " + " | ".join(number(row, key, digits) for key, _, digits in table) + " |")
    return lines


def load_reference_estimator(
    path: str | os.PathLike[str], model_id: str | None = None, save_to: str | os.PathLike[str] | None = None
) -> ScoreEstimator:
    """Load a reference `score_estimator.pt` (optionally saving it in at2-rag's safetensors form)."""
    return ScoreEstimator.from_reference(path, model_id=model_id, save_to=save_to)
