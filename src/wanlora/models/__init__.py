"""The base model: loading a Wan 2.2 T2V A14B diffusers folder or hub id (`loading`), tiny random
models for tests and the demo (`tiny`), full-size shapes and FLOP counts (`geometry`), the text
and latent caches (`text`, `latents`), quantization and offloading (their own modules).

Import from the submodules; this package imports nothing so that `import wanlora.models.geometry`
does not pay for transformers.
"""
