from wanlora.data.captions import dropout_texts
from wanlora.models.loading import resolve_model
from wanlora.models.text import run_stage
from wanlora.pipeline import CAPTION_MANIFEST, TEXT_CACHE
from wanlora.stages._common import WORKSPACE, load, resolve_device


def main() -> None:
    params = load()
    root = resolve_model(params.model.name_or_path, params.model.revision, parts=("text_encoder", "tokenizer"))
    run_stage(
        root=root,
        captions_manifest=WORKSPACE / CAPTION_MANIFEST,
        prompts=[*params.sample.prompts, params.sample.negative_prompt],
        trigger=params.job.trigger_word,
        dropout=dropout_texts(params.job.trigger_word, params.train.dop.preservation_class),
        out_dir=WORKSPACE / TEXT_CACHE,
        dtype=params.model.dtype,
        quant=params.quantization.text_encoder,
        device=resolve_device(params.job.device),
        store=WORKSPACE / "scratch/cache/text",
    )
