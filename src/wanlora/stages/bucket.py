from wanlora.data.buckets import run_stage
from wanlora.models.loading import resolve_model
from wanlora.models.variant import resolve_variant
from wanlora.pipeline import BUCKETS, CLIPS
from wanlora.stages._common import WORKSPACE, load


def main() -> None:
    params = load()
    # the configs alone say which Wan 2.2 model it is: its frame rate and the pixels a bucket side aligns to
    variant = resolve_variant(params.model.variant, resolve_model(params.model.name_or_path, params.model.revision, parts=()))
    run_stage(params.datasets, WORKSPACE / CLIPS, WORKSPACE / BUCKETS,
              fps=variant.fps, align=variant.bucket_align)
