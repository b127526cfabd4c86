from wanlora.models.latents import run_stage
from wanlora.models.loading import resolve_model
from wanlora.models.variant import resolve_variant
from wanlora.pipeline import LATENT_CACHE, SAMPLES
from wanlora.stages._common import WORKSPACE, load, resolve_device


def main() -> None:
    params = load()
    root = resolve_model(params.model.name_or_path, params.model.revision, parts=("vae",))
    run_stage(
        root=root,
        samples_manifest=WORKSPACE / SAMPLES,
        workspace=WORKSPACE,
        out_dir=WORKSPACE / LATENT_CACHE,
        mode=params.train.latent_mode,
        dtype="fp32",
        device=resolve_device(params.job.device),
        store=WORKSPACE / "scratch/cache/latents",
        enabled_datasets={name for name, ds in params.datasets.items() if ds.cache_latents},
        folders={name: ds.folder for name, ds in params.datasets.items()},
        variant=resolve_variant(params.model.variant, root),
        last_frame=params.train.last_frame,
    )
