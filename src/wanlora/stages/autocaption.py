from wanlora.data.autocaption import run_stage
from wanlora.media.decode import read_frames
from wanlora.models.captioner import Captioner, Decoding
from wanlora.models.loading import captioner_identity, make_token_counter, resolve_captioner, resolve_model
from wanlora.pipeline import AUTOCAPTIONS, CAPTION_INDEX, CLIPS
from wanlora.stages._common import WORKSPACE, load, resolve_device


def main() -> None:
    params = load()
    cfg = params.autocaption
    root = resolve_captioner(cfg.model, cfg.revision) if cfg.mode != "off" else None
    wan = resolve_model(params.model.name_or_path, params.model.revision, parts=("tokenizer",))
    decoding = Decoding(cfg.max_new_tokens, cfg.num_beams, cfg.repetition_penalty)
    run_stage(
        clips_manifest=WORKSPACE / CLIPS,
        caption_index=WORKSPACE / CAPTION_INDEX,
        datasets=params.datasets,
        cfg=cfg,
        workspace=WORKSPACE,
        out_dir=WORKSPACE / AUTOCAPTIONS,
        store=WORKSPACE / "scratch/autocaptions",
        model=f"{cfg.model}@{cfg.revision}",
        identity=captioner_identity(root) if root else "",
        open_describer=lambda: Captioner(root, cfg.dtype, resolve_device(params.job.device), cfg.frame_side, decoding),
        read_frames=read_frames,
        count_tokens=make_token_counter(wan),
    )
