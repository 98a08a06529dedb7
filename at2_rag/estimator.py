"""The linear score estimator: score = w . f over the L*H head features; stored as safetensors + config.json."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import EstimatorFormatError, EstimatorMismatchError
from .features import FEATURE_DEFINITION, FEATURE_VERSION

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
REFERENCE_NAME = "score_estimator.pt"
SHIPPED_PACKAGE = "at2_rag.estimators"


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
    def uniform(cls, num_layers: int, num_heads: int, model_id: str | None = None) -> "ScoreEstimator":
        """Average attention over all heads: AT2's starting point and the untrained baseline."""
        n = num_layers * num_heads
        return cls(torch.full((n,), 1.0 / n), num_layers, num_heads, model_id=model_id, trained=False)

    @classmethod
    def single_head(cls, layer: int, head: int, num_layers: int, num_heads: int, **kw: Any) -> "ScoreEstimator":
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

    def l1_normalize_(self) -> "ScoreEstimator":
        with torch.no_grad():
            norm = self.weights.abs().sum()
            if norm > 0:
                self.weights /= norm
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
            "format": "at2-rag-estimator",
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
            save_file({"weights": self.weights.detach().contiguous().cpu()}, str(tmp / WEIGHTS_NAME))
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2, default=str) + "\n")
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
        from .files import atomic_path

        folder = Path(folder)
        with atomic_path(folder / CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps(self.config_dict(), indent=2, default=str) + "\n")
        with atomic_path(folder / CARD_NAME) as tmp:
            tmp.write_text(self.model_card())

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
            if key in meta:
                lines.append(f"- {key.replace('_', ' ').capitalize()}: {meta[key]}")
        evaluation = meta.get("evaluation")
        if isinstance(evaluation, dict) and isinstance(evaluation.get("summary"), dict):
            lines += ["", *evaluation_table(evaluation)]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str]) -> "ScoreEstimator":
        folder = Path(folder)
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        if not config_path.is_file() or not weights_path.is_file():
            if (folder / REFERENCE_NAME).is_file():
                from .reference_format import load_reference_estimator

                return load_reference_estimator(folder / REFERENCE_NAME)
            raise EstimatorFormatError(f"{folder} has no {CONFIG_NAME} + {WEIGHTS_NAME} (nor a {REFERENCE_NAME})")
        try:
            config = json.loads(config_path.read_text())
            tensors = load_file(str(weights_path))
        except Exception as exc:
            raise EstimatorFormatError(f"cannot read the estimator in {folder}: {exc}") from exc
        if config.get("feature_version", FEATURE_VERSION) != FEATURE_VERSION:
            raise EstimatorFormatError(
                f"estimator in {folder} uses feature version {config.get('feature_version')}, this at2-rag "
                f"computes version {FEATURE_VERSION}"
            )
        if "weights" not in tensors:
            raise EstimatorFormatError(f"{weights_path} has no 'weights' tensor (found {sorted(tensors)})")
        try:
            return cls(
                tensors["weights"],
                int(config["num_layers"]),
                int(config["num_heads"]),
                model_id=config.get("model_id"),
                trained=bool(config.get("trained", True)),
                metadata=config.get("metadata") or {},
            )
        except KeyError as exc:
            raise EstimatorFormatError(f"{config_path} lacks the key {exc}") from exc

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], **hub_kwargs: Any) -> "ScoreEstimator":
        """Load from a folder, a reference-format `.pt` file, or a Hugging Face Hub repo id."""
        path = Path(name_or_path)
        if path.is_dir():
            return cls.from_folder(path)
        if path.is_file():
            from .reference_format import load_reference_estimator

            return load_reference_estimator(path)
        return cls._from_hub(str(name_or_path), **hub_kwargs)

    @classmethod
    def _from_hub(cls, repo_id: str, **hub_kwargs: Any) -> "ScoreEstimator":
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
            from .reference_format import PUBLISHED_ESTIMATORS

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
    def shipped(cls, model_id: str) -> "ScoreEstimator | None":
        """The estimator bundled inside the package for `model_id`, if there is one."""
        root = resources.files(SHIPPED_PACKAGE) / model_slug(model_id)
        if not (root / CONFIG_NAME).is_file():
            return None
        with resources.as_file(root) as folder:
            return cls.from_folder(folder)

    def extra_repr(self) -> str:
        return f"layers={self.num_layers}, heads={self.num_heads}, model_id={self.model_id!r}, trained={self.trained}"


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

    lines = [
        f"## Evaluation ({evaluation.get('num_examples', '?')} held-out examples"
        + (f", {evaluation['examples']}" if evaluation.get("examples") else "") + ")",
        "",
        "| method | LDS | LDS, document-dependent sentences | top-1 log-prob drop | top-3 log-prob drop "
        "| extra forward passes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in summary.items():
        lines.append(
            f"| {name} | {number(row, 'lds', 3)} | {number(row, 'lds_dependent', 3)} | {number(row, 'top1_drop', 2)} "
            f"| {number(row, 'top3_drop', 2)} | {number(row, 'extra_forward_passes', 1)} |"
        )
    return lines
