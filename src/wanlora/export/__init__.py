"""LoRA formats (ComfyUI, diffusers, peers' imports), lineage metadata, audit, and the export stage.

Import from the submodules: this package imports nothing, so the train stage, which writes lineage
with `wanlora.export.lineage`, does not load the export stage and its converters as code it never
declared (tests/test_stage_contract.py)."""
