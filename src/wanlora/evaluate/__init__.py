"""Evaluation of trained checkpoints: samples through both experts, validation loss, report page.

Import from the submodules (`wanlora.evaluate.stage` for the stage): this package imports nothing."""
