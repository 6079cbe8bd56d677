"""Which `transformers` versions compute Olmo-3 the way the checkpoints were trained.

transformers 5.0 – 5.12 applied YaRN (and its 1.208 cos/sin factor) to every Olmo-3 layer;
4.57.x and >= 5.13.1 apply it to full-attention layers only, as OLMo-core does (models.md §5.1).
Our Olmo-3 follows the correct behaviour, so HF references must come from a good version.
"""

from __future__ import annotations

from packaging.version import Version

MIN_FIXED = Version("5.13.1")


def olmo3_reference_ok(version: str) -> bool:
    v = Version(version)
    return v < Version("5.0.0.dev0") and v >= Version("4.57.0") or v >= MIN_FIXED


def check_olmo3_reference(version: str | None = None) -> None:
    """Raise if `version` (default: installed transformers) has the all-layers-YaRN Olmo-3 bug."""
    if version is None:
        import transformers

        version = transformers.__version__
    if not olmo3_reference_ok(version):
        raise RuntimeError(
            f"transformers {version} applies YaRN RoPE to every Olmo-3 layer (versions 5.0–5.12, "
            "huggingface/transformers PR #45945); its Olmo-3 logits differ from the trained model. "
            "Use transformers 4.57.x or >= 5.13.1 as the reference.")
