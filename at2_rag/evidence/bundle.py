"""`Evidence`: what the optional measured passes of one run found, handed to scoring as one value."""

from __future__ import annotations

from dataclasses import dataclass

from .ablations import AblationEvidence
from .groundedness import GroundednessEvidence


@dataclass
class Evidence:
    """The measured evidence of one run: its answer with every document (every earlier turn) removed
    (`Attributor.measure_groundedness`) and k ablation passes (`Attributor.ablate`); either may be absent."""

    groundedness: GroundednessEvidence | None = None
    ablations: AblationEvidence | None = None

    @property
    def passes(self) -> int:
        """Forward passes this evidence cost beyond the run itself."""
        return (self.groundedness.passes if self.groundedness else 0) + (self.ablations.passes if self.ablations else 0)
