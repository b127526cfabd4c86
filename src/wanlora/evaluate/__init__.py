"""Evaluation of trained checkpoints: samples through both experts, validation loss, report page."""

from wanlora.evaluate.stage import run_stage

__all__ = ["run_stage"]
