"""wanlora: raw clips in, auditable Wan 2.2 T2V A14B LoRAs out, through a DVC pipeline."""

__version__ = "0.1.0"
