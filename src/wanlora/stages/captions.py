from wanlora.data.captions import run_stage
from wanlora.models.loading import make_token_counter, resolve_model
from wanlora.pipeline import AUTOCAPTION_MANIFEST, CAPTION_INDEX, CAPTIONS, CLIPS, SAMPLES
from wanlora.stages._common import WORKSPACE, load


def main() -> None:
    params = load()
    root = resolve_model(params.model.name_or_path, params.model.revision, parts=("tokenizer",))
    run_stage(
        job=params.job,
        datasets=params.datasets,
        dop=params.train.dop,
        clips_manifest=WORKSPACE / CLIPS,
        samples_manifest=WORKSPACE / SAMPLES,
        caption_index=WORKSPACE / CAPTION_INDEX,
        workspace=WORKSPACE,
        out_dir=WORKSPACE / CAPTIONS,
        count_tokens=make_token_counter(root),
        trigger_only=params.train.unload_text_encoder,
        autocaptions=WORKSPACE / AUTOCAPTION_MANIFEST,
    )
