"""LoRA formats (ComfyUI, diffusers, peers' imports), lineage metadata, audit, and the export stage."""

from wanlora.export.stage import run_stage

__all__ = ["run_stage"]
