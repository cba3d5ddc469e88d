"""The stand-in ComfyUI host's (comfy_standin.py) text side for LongCat-Image and Ovis-Image, which ComfyUI runs as Flux
(comfy_standin_joint.FluxModel stands in for the model; the newest readable ComfyUI builds both with its Flux class,
LongCat through model_base.LongCatImage(Flux), and marks them by the Flux attributes they lack or have:
`vector_in` None, Ovis's `txt_norm`). Written from ComfyUI's comfy/text_encoders/longcat_image.py (588db3d4e7e5) and
ovis.py (aa1fb113d5e2), with the tiny Qwen2 BPE of comfy_standin_qwen:

- LongCatCLIP: the template's prefix (system turn, "<|im_start|>user\\n"), the prompt's own tokens padded with
  <|endoftext|> to PAD_TO (ComfyUI: 512), the suffix ("<|im_end|>\\n<|im_start|>assistant\\n"). Its encoder drops the
  prefix as Qwen-Image's does and the suffix: the model's text keys are the prompt's padded tokens.
- OvisCLIP: the prompt in Ovis's template (a user turn ending "…background: {}", an empty think block after the
  assistant turn), weights disabled, the whole padded with <|endoftext|> to MIN_LENGTH (ComfyUI: 284). Its encoder
  keeps the tokens from the ":" after "Ġbackground" (id 4004 in Qwen's vocabulary, given that id here).
- KleinCLIP: Flux.2 Klein's Qwen3 tokenizer (comfy/text_encoders/flux.py, KleinTokenizer: its chat template with an
  empty think block, weights disabled, min_length 512), padded here to KLEIN_LENGTH; every token a text key.
"""

from __future__ import annotations

import comfy_standin_qwen as cq

PAD = 151643
LONGCAT_PREFIX = ("<|im_start|>system\nAs an image captioning expert, generate a descriptive text prompt based on an "
                  "image content, suitable for input to a text-to-image model.<|im_end|>\n<|im_start|>user\n")
LONGCAT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
PAD_TO = 16
OVIS_TEMPLATE = ("<|im_start|>user\nDescribe the image by detailing the color, quantity, text, shape, size, texture, "
                 "spatial relationships of the objects and background: {}<|im_end|>\n<|im_start|>assistant\n<think>\n\n"
                 "</think>\n\n")
MIN_LENGTH = 64
OVIS_CUT = 4004
KLEIN_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
KLEIN_LENGTH = 40


class LongCatCLIP:
    key = "qwen25_7b"

    def __init__(self):
        self.tokenizer = cq.qwen_tokenizer()

    def _ids(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def tokenize(self, text):
        prompt = self._ids(text or " ")                 # ComfyUI encodes an empty prompt as " "
        ids = self._ids(LONGCAT_PREFIX) + prompt + [PAD] * (PAD_TO - len(prompt)) + self._ids(LONGCAT_SUFFIX)
        return {self.key: [[(i, 1.0) for i in ids]]}


class OvisCLIP:
    key = "qwen3_2b"

    def __init__(self):
        self.tokenizer = cq.qwen_tokenizer()
        self.background = self.tokenizer.convert_tokens_to_ids("Ġbackground")

    def tokenize(self, text):
        ids = [OVIS_CUT if i == self.background else i for i in self.tokenizer(OVIS_TEMPLATE.format(text))["input_ids"]]
        return {self.key: [[(i, 1.0) for i in ids + [PAD] * (MIN_LENGTH - len(ids))]]}


class KleinCLIP:
    key = "qwen3_4b"

    def __init__(self):
        self.tokenizer = cq.qwen_tokenizer()

    def tokenize(self, text):
        ids = self.tokenizer(KLEIN_TEMPLATE.format(text))["input_ids"]
        return {self.key: [[(i, 1.0) for i in ids + [PAD] * (KLEIN_LENGTH - len(ids))]]}
