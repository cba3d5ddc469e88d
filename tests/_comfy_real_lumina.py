"""bin/check-comfyui's `lumina2` and `pixart` checks on ComfyUI's own model classes.

lumina2: a tiny random Lumina 2 (comfy.supported_models.Lumina2: ComfyUI's NextDiT, 1 context refiner, 1 noise
refiner, 2 main layers, 2 query heads over 1 key/value head as Lumina 2's grouped heads), sampled by comfy.sample with
cond and uncond batched. The words are found by ComfyUI's own LuminaTokenizer (Gemma 2: <bos> first, no padding,
the text node's system prompt before the prompt), its SentencePiece model, absent from the checkout, replaced by a
Gemma-like stand-in with SentencePiece's conventions. ComfyUI 0.3.64's loop writes no block_index, so the node counts
the main layers' calls after the refiners' (comfy_host/nextdit.py). Every main call's positive image queries equal
the explicit bent softmax; the refiners' calls, the text queries and the negative rows are the backend's output bit
for bit; strength 0 samples bit-identically; a window [1, 1] bends step 1 alone; a layer list bends its layers alone;
a negative prompt of another length runs in model calls of its own, untouched; a positive context padded with 4
masked tokens (ComfyUI keeps the mask's tokens) bends as the unpadded one.

pixart: ComfyUI's own PixArtMS is refused by comfy_host.dit_layout with its one-line reason.
"""

import types

import torch

from ckptbend.runtime import bending, comfy_host

LUMINA2 = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 32, "cap_feat_dim": 24,
           "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 1, "multiple_of": 16, "qk_norm": True,
           "axes_dims": [4, 6, 6], "axes_lens": [300, 512, 512]}
SYSTEM = ("You are an assistant designed to generate superior images with the superior degree of image-text "
          "alignment based on textual prompts or user prompts. <Prompt Start> ")     # CLIPTextEncodeLumina2's
PIXART = {"image_model": "pixart_alpha", "input_size": 16, "patch_size": 2, "in_channels": 4, "hidden_size": 32,
          "depth": 2, "num_heads": 2, "caption_channels": 24, "model_max_length": 16, "pe_interpolation": 1.0,
          "micro_condition": False}


class Clip:
    """A CLIP object as the node uses it (tokenize() is the tokenizer's tokenize_with_weights); pieces: id → text."""

    def __init__(self, tokenizer, pieces):
        self.tokenize, self.pieces = tokenizer.tokenize_with_weights, pieces


def lumina_clip():
    """ComfyUI's LuminaTokenizer, its SPieceTokenizer (sentencepiece and Gemma's model are not here) a stand-in over
    the Gemma-like Unigram tokenizer of tests/_cross_families.py (<bos> first, spaces as "▁")."""
    import comfy.text_encoders.lumina2 as lumina2
    from _cross_families import gemma_like_tokenizer

    gemma = gemma_like_tokenizer()

    class SPiece:
        @staticmethod
        def from_pretrained(path, add_bos=True, add_eos=False):
            return SPiece()

        def get_vocab(self):
            return gemma.get_vocab()

        def __call__(self, text):
            return {"input_ids": gemma(text)["input_ids"]}

    real, lumina2.SPieceTokenizer = lumina2.SPieceTokenizer, SPiece
    try:
        return Clip(lumina2.LuminaTokenizer(), gemma.convert_ids_to_tokens)
    finally:
        lumina2.SPieceTokenizer = real


def main_check(h, seen, n_text, n_image, columns, grid, entry, bent_at):
    """check() for h.recording(): a main-layer call (n_text + n_image queries and keys) of layer bent_at(sigma, n)
    (n: the main calls before it in its model call) equals, on its positive rows' image queries, the explicit bent
    softmax; every other call and row is the backend's output bit for bit."""
    state = {"sigma": None, "n": 0}

    def check(q, k, v, heads, out, plain, options, mask):
        qh, kh, vh = (t.float() for t in (q, k, v))                 # skip_reshape: [b, heads, L, d]
        sigma = float(options["sigmas"][0])
        joint = qh.shape[2] == kh.shape[2] == n_text + n_image
        if joint:
            state["n"] = state["n"] + 1 if state["sigma"] == sigma else 0
            state["sigma"] = sigma
        rows = comfy_host.common.chunk_rows(options["cond_or_uncond"], 0, q.shape[0])
        if not joint or not rows or not bent_at(sigma, state["n"]):
            assert torch.equal(out, plain), "a call not bent changed"
            seen["other"] += 1
            return
        logits = qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5
        probs = torch.softmax(logits if mask is None else logits + comfy_host.common.logit_bias(mask), -1)[rows]
        image, text = slice(n_text, n_text + n_image), slice(0, n_text)
        block = probs[:, :, image, text].reshape(-1, n_image, n_text)
        unwindowed = {**entry, "renormalize": "none", "apply_to_timesteps": None, "apply_to_layers": None}
        probs[:, :, image, text] = bending.bend_probs(block, columns, grid, [unwindowed], 0, 0).view(
            len(rows), heads, n_image, n_text)
        probs = probs[:, :, image] / probs[:, :, image].sum(-1, keepdim=True)
        expected = plain.clone().view(q.shape[0], -1, heads, qh.shape[-1])
        expected[rows, image] = (probs @ vh[rows]).transpose(1, 2).to(plain.dtype)
        expected = expected.view(plain.shape)
        seen["error"] = max(seen["error"], float((out - expected).abs().max() / expected.abs().max()))
        others = [r for r in range(q.shape[0]) if r not in rows]
        assert torch.equal(out[others], plain[others]) and torch.equal(out[:, :n_text], plain[:, :n_text])
        seen["bent"] += 1

    return check


def check_lumina2(h):
    """Lumina 2 on ComfyUI's NextDiT: latent 8 × 12 → a 4 × 6 grid after the [system prompt + prompt] tokens."""
    clip = lumina_clip()
    patcher = h.random_model(h.comfy.supported_models.Lumina2, LUMINA2)
    layout = comfy_host.dit_layout(patcher.model.diffusion_model)
    prompt = SYSTEM + h.PROMPT
    columns = comfy_host.token_columns(clip, prompt, ["sunset"], layout.text_key)
    ids = [i for i, _ in clip.tokenize(prompt.replace("{", "").replace("}", ""))[layout.text_key][0]]
    pieces = clip.pieces(ids)
    assert (layout.kind, layout.text_key) == ("nextdit", "gemma2_2b") and ids[0] == 2
    assert [pieces[j] for j in columns["sunset"]] == ["▁sun", "set"], [pieces[j] for j in columns["sunset"]]
    n_text, grid = len(ids), (4, 6)
    g = torch.Generator().manual_seed(1)
    conds = [[[torch.randn(1, n, 24, generator=g), {"attention_mask": torch.ones(1, n, dtype=torch.long)}]]
             for n in (n_text, n_text, n_text - 5)]
    padded = torch.cat([conds[0][0][0], torch.randn(1, 4, 24, generator=g)], 1)    # 4 padding tokens, masked out
    conds.append([[padded, {"attention_mask": (torch.arange(n_text + 4) < n_text).long()[None]}]])
    run = lambda m, negative=conds[1], positive=conds[0]: h.sample(m, (1, 16, 8, 12), positive, negative,  # noqa
                                                                   cfg=2.0)
    node = lambda entry, **values: h.node(patcher, {"bending": [entry]}, clip, bending_prompt=prompt, **values)  # noqa

    base = run(patcher)
    assert torch.equal(run(node(h.ENTRY, bend1_strength=0.0)), base)
    step1 = round(float(h.comfy.samplers.calculate_sigmas(patcher.model.model_sampling, "simple", 3)[1]), 4)
    cases = [("every step and layer", h.ENTRY, lambda sigma, n: True, 2 * 3),
             ("step window [1, 1]", {**h.ENTRY, "apply_to_timesteps": [1, 1]},
              lambda sigma, n: round(sigma, 4) == step1, 2),
             ("layers [1]", {**h.ENTRY, "apply_to_layers": [1]}, lambda sigma, n: n == 1, 3),
             ("a shorter negative (its own model calls)", h.ENTRY, lambda sigma, n: True, 2 * 3),
             ("a padded positive under its attention mask", h.ENTRY, lambda sigma, n: True, 2 * 3)]
    for name, entry, bent_at, expected in cases:
        seen = {"bent": 0, "other": 0, "error": 0.0}
        positive = conds[3] if name.startswith("a padded") else conds[0]
        negative = conds[2] if name.startswith(("a shorter", "a padded")) else conds[1]
        m = h.recording(node(entry), main_check(h, seen, n_text, 24, columns, grid, entry, bent_at))
        change = float((run(m, negative, positive) - run(patcher, negative, positive)).abs().max())
        print(f"  {name}: columns {columns}, {n_text} text tokens, largest change of the sample {change:.3g}; "
              f"calls {seen}")
        assert seen["bent"] == expected and seen["error"] < 1e-5 and change > 0


def check_pixart(h):
    """ComfyUI's own PixArtMS (comfy.supported_models.PixArtAlpha) is refused in one line, before any sampling."""
    patcher = h.random_model(h.comfy.supported_models.PixArtAlpha, PIXART)
    dm = patcher.model.diffusion_model
    try:
        comfy_host.dit_layout(dm)
    except ValueError as refusal:
        reason = str(refusal)
    else:
        raise AssertionError(f"{type(dm).__name__} was not refused")
    print(f"  {type(dm).__name__}: {reason}")
    assert type(dm).__name__ == "PixArtMS" and "does not reach PixArt" in reason and "\n" not in reason


def checks(h):
    """{name: check} for check-comfyui, h its namespace (random_model, node, sample, recording, ENTRY, PROMPT)."""
    h = types.SimpleNamespace(**h)
    return {"lumina2": lambda: check_lumina2(h), "pixart": lambda: check_pixart(h)}
