"""What every export reads: the checked results document and, when it names one, its companion."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maxact_card.documents import LINEAR_INPUTS, load_results, read_companion, require_channels
from maxact_card.errors import UsageError

if TYPE_CHECKING:
    import torch

def static_scale(amax: float, qmax: float) -> float:
    """amax / qmax, the symmetric static scale of a tensor whose max|a| is amax (1 for an all-zero
    tensor: a scale of 0 cannot dequantize)."""
    return amax / qmax if amax > 0 else 1.0


@dataclass(frozen=True)
class Inputs:
    """A results document (schema-valid) and its companion's bytes (sha256-checked; None when the
    results name none). `source` names the results file in messages."""

    results: dict[str, Any]
    source: str
    companion: bytes | None

    @classmethod
    def load(cls, results_path: Path) -> Inputs:
        """Read and check a results file and its companion (UsageError/SchemaError on bad input)."""
        return cls.read(load_results(results_path), results_path)

    @classmethod
    def read(cls, results: dict[str, Any], results_path: Path) -> Inputs:
        """Results already read (and validated) from `results_path`, with their companion checked."""
        return cls(results, str(results_path), read_companion(results, results_path))

    def sites(self, *components: str) -> list[dict[str, Any]]:
        """The results' sites of these components, in results order."""
        return [s for s in self.results["sites"] if s["component"] in components]

    def linear_sites(self, what: str) -> list[dict[str, Any]]:
        """The sites that are the input of Linear layers (each naming its readers); without the
        attention and MLP inputs (`measure --gemm-inputs`) the export would miss most layers."""
        sites = [s for s in self.sites(*LINEAR_INPUTS) if s.get("readers")]
        if not any(s["component"] == "attn_input" for s in sites):
            raise UsageError(f"{self.source} has no attention-input sites, which {what} needs for q/k/v",
                             hint="measure with --gemm-inputs (the inputs of every Linear layer)")
        return sites

    def vectors(self, what: str) -> dict[str, torch.Tensor]:
        """The per-channel vectors of the companion, by site name, each checked against its site's width."""
        require_channels(self.results, source=self.source, what=what)
        assert self.companion is not None  # `read_companion` checked it is there
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            vectors = load(self.companion)
        except (SafetensorError, ValueError) as exc:
            raise UsageError(f"the companion of {self.source} is not a safetensors file ({exc})",
                             hint="measure again") from None
        for site in self.results["sites"]:
            vector = vectors.get(site["name"])
            width = site.get("width")
            if vector is None or vector.dim() != 1 or (width is not None and vector.numel() != width):
                raise UsageError(f"the companion of {self.source} holds no vector of width {width} for site "
                                 f"{site['name']}", hint="measure again")
        return vectors
