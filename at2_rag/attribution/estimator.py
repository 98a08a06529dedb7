"""The linear score estimator: score = w . f over the L*H head features, and its folder (safetensors +
config.json + model card) saved and loaded symmetrically.

The folder's format and its checked readers are `estimator_config`; the card's text is `estimator_card`.
save_pretrained runs the loader's checks before writing, so whatever it writes loads back.
"""

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
from safetensors.torch import save_file

from ..capture.features import FEATURE_DEFINITION, FEATURE_VERSION
from ..errors import EstimatorFormatError, EstimatorMismatchError
from ..storage.reference_format import PUBLISHED_ESTIMATORS, ReferenceEstimator, read_reference_estimator
from ..storage.validation import describe_value
from .estimator_card import estimator_card
from .estimator_config import (
    CARD_NAME,
    CONFIG_NAME,
    FORMAT_NAME,
    REFERENCE_NAME,
    SHIPPED_PACKAGE,
    WEIGHTS_KEY,
    WEIGHTS_NAME,
    checked_index,
    model_slug,
    parse_config,
    read_config,
    read_weights,
)
from .grounding import GroundednessCalibration

logger = logging.getLogger(__name__)


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
        num_layers, num_heads = checked_index(num_layers, "num_layers"), checked_index(num_heads, "num_heads")
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
        """The README.md written beside the weights (see `estimator_card`)."""
        return estimator_card(self)

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


def load_reference_estimator(
    path: str | os.PathLike[str], model_id: str | None = None, save_to: str | os.PathLike[str] | None = None
) -> ScoreEstimator:
    """Load a reference `score_estimator.pt` (optionally saving it in at2-rag's safetensors form)."""
    return ScoreEstimator.from_reference(path, model_id=model_id, save_to=save_to)
