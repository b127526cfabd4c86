"""A Qwen-VL captioner: a few frames and an instruction in, one caption out, deterministically.

The frames go in as a sequence of images rather than as a video: transformers' video processors
need torchvision, which the stack does not carry, while the PIL image processor does not, and
Qwen2.5-VL and Qwen3-VL both read several images of one message in order. The image tokens are
expanded here exactly as transformers' Qwen-VL processors expand them (one `<|image_pad|>`
becomes grid_t * grid_h * grid_w / merge_size**2 tokens), for the same reason.

Decoding is greedy or beam search, never sampling, so the same frames, prompt and weights give
the same caption on every run; the stage's store relies on that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from wanlora.models.loading import captioner_identity, load_captioner

IMAGE_PAD = "<|image_pad|>"
#: Both Qwen-VL generations work on 16- or 14-pixel patches merged 2x2: 32 keeps every side whole.
SIDE_MULTIPLE = 32


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int
    num_beams: int
    repetition_penalty: float


def fit_frame(frame: np.ndarray, side: int) -> Image.Image:
    """An RGB frame resized to about side*side pixels, aspect kept, each side a multiple of 32, so
    the image processor's own resize leaves it alone and the token count is known in advance."""
    h, w = frame.shape[:2]
    scale = (side * side / (w * h)) ** 0.5
    new_w = max(SIDE_MULTIPLE, round(w * scale / SIDE_MULTIPLE) * SIDE_MULTIPLE)
    new_h = max(SIDE_MULTIPLE, round(h * scale / SIDE_MULTIPLE) * SIDE_MULTIPLE)
    return Image.fromarray(frame).resize((new_w, new_h), Image.Resampling.BICUBIC)


class Captioner:
    """A loaded captioner; `close()` frees it (the stage's VLM never outlives the stage)."""

    def __init__(self, root: Path, dtype: str, device: str, side: int, decoding: Decoding):
        self.root = Path(root)
        self.identity = captioner_identity(self.root)
        self.device, self.side, self.decoding = device, side, decoding
        self.model, self.tokenizer, self.images = load_captioner(self.root, dtype, device)
        merge = getattr(self.images, "merge_size", 2)
        self._merge_area = merge * merge

    def prompt_ids(self, n_images: int, instruction: str, grids: torch.Tensor) -> torch.Tensor:
        """Token ids of one user turn (the images, then the instruction) and the assistant's start."""
        content: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images)]
        content.append({"type": "text", "text": instruction})
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        if text.count(IMAGE_PAD) != n_images:
            raise ValueError(f"{self.root}: the chat template wrote {text.count(IMAGE_PAD)} image placeholders for "
                             f"{n_images} images; is this a Qwen-VL model?")
        pieces = text.split(IMAGE_PAD)
        expanded = pieces[0]
        for grid, piece in zip(grids, pieces[1:], strict=True):
            expanded += IMAGE_PAD * int(grid.prod().item() // self._merge_area) + piece
        return self.tokenizer(expanded, return_tensors="pt", add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def __call__(self, frames: Sequence[np.ndarray], instruction: str) -> str:
        """The caption the model writes for `frames` (uint8 RGB, in order) under `instruction`."""
        decoding = self.decoding
        pictures = [fit_frame(f, self.side) for f in frames]
        vision = self.images(images=pictures, return_tensors="pt")
        ids = self.prompt_ids(len(pictures), instruction, vision["image_grid_thw"])
        dtype = next(self.model.parameters()).dtype
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=torch.ones_like(ids).to(self.device),
            pixel_values=vision["pixel_values"].to(self.device, dtype),
            image_grid_thw=vision["image_grid_thw"].to(self.device),
            max_new_tokens=decoding.max_new_tokens,
            num_beams=decoding.num_beams,
            repetition_penalty=decoding.repetition_penalty,
            do_sample=False,
            temperature=None, top_p=None, top_k=None,  # a checkpoint's sampling defaults must not warn or apply
        )
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    def close(self) -> None:
        """Drop the weights and, on a GPU, give the memory back before the next stage's model."""
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
