"""bin/check-comfyui's `hidream`, `cosmos` and `ltxv` checks: the node on tiny random models built by ComfyUI's own
classes (comfy.supported_models HiDream, CosmosT2IPredict2, LTXV), sampled by comfy.sample with cond and uncond in
one batch, the words found by ComfyUI's own tokenizers (HiDreamTokenizer, CosmosT5Tokenizer, LTXVT5Tokenizer; the
checkout lacks Llama 3.1's tokenizer.json, so HiDream's Llama part is the stand-in's byte-level BPE put in its
place; its Llama conditioning comes from ComfyUI's own Llama code, tiny). Every bent call's positive image queries
equal the explicit bent softmax (mask added); the negative rows, the text queries and the calls not bent are the
backend's output bit for bit; strength 0 samples bit-identically; a window [1, 1] bends step 1 alone.
"""

import types

import torch

from ckptbend.runtime import bending, comfy_host

HIDREAM = {"image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
           "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "caption_channels": [32, 24],
           "text_emb_dim": 32, "num_routed_experts": 2, "num_activated_experts": 1, "axes_dims_rope": [8, 4, 4],
           "max_resolution": [16, 16], "llama_layers": [0, 1, 2, 3]}
COSMOS = {"image_model": "cosmos_predict2", "max_img_h": 240, "max_img_w": 240, "max_frames": 128, "in_channels": 16,
          "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1, "model_channels": 32,
          "concat_padding_mask": True,
          "crossattn_emb_channels": 32, "pos_emb_cls": "rope3d", "pos_emb_learnable": True,
          "pos_emb_interpolation": "crop", "min_fps": 1, "max_fps": 30, "use_adaln_lora": True, "adaln_lora_dim": 16,
          "num_blocks": 2, "num_heads": 2, "extra_per_block_abs_pos_emb": False, "rope_h_extrapolation_ratio": 4.0,
          "rope_w_extrapolation_ratio": 4.0, "rope_t_extrapolation_ratio": 1.0}
LTXV = {"image_model": "ltxv", "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
        "cross_attention_dim": 32, "caption_channels": 32, "in_channels": 128}


class Clip:
    """A CLIP object as the node uses it: tokenize() is the tokenizer's tokenize_with_weights."""

    def __init__(self, tokenizer):
        self.tokenize = tokenizer.tokenize_with_weights


def hidream_clip():
    """ComfyUI's HiDreamTokenizer (CLIP-L/G, T5 to 128, Llama), its Llama tokenizer the stand-in's."""
    import comfy.text_encoders.hidream as hd
    import comfy_standin_hidream as ch

    class Llama:                               # the stand-in's tokens, at least 128 as LLAMA3Tokenizer(min_length=128)
        def __init__(self, *args, min_length=128, pad_token=128009, **kwargs):
            self.standin, self.min_length, self.pad = ch.HiDreamCLIP(), min_length, pad_token

        def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
            ids = [t for t in self.standin.tokenize(text)["llama"][0] if t[0] != ch.EOT]
            return [ids + [(self.pad, 1.0)] * max(0, self.min_length - len(ids))]

    real, hd.hunyuan_video.LLAMA3Tokenizer = hd.hunyuan_video.LLAMA3Tokenizer, Llama
    try:
        return Clip(hd.HiDreamTokenizer())
    finally:
        hd.hunyuan_video.LLAMA3Tokenizer = real


def bent_check(h, seen, n_text_of, columns, grid, image_first, entry=None, bent_at=lambda sigma: True):
    """check() for h.recording(): a call with n_text_of(k) text keys (None: not bent) at a step bent_at(sigma)
    equals, on its positive rows' image queries, the explicit bent softmax (ComfyUI's mask added); all else is the
    backend's output."""
    frames, gh, gw = grid
    entry = entry or h.ENTRY
    n_image = frames * gh * gw

    def check(q, k, v, heads, out, plain, options, mask):
        qh, kh, vh = (t.float() if t.ndim == 4 else t.float().view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
                      for t in (q, k, v))
        n_text = n_text_of(kh.shape[2])
        rows = comfy_host.common.chunk_rows(options["cond_or_uncond"], 0, q.shape[0])
        if n_text is None or not rows or not bent_at(float(options["sigmas"][0])):
            assert torch.equal(out, plain), "a call not bent changed"
            seen["other"] += 1
            return
        image = slice(0, n_image)
        text = slice(n_image, n_image + n_text) if image_first else slice(0, n_text)
        logits = qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5
        probs = torch.softmax(logits if mask is None else logits + comfy_host.common.logit_bias(mask), -1)[rows]
        block = probs[:, :, image, text].reshape(-1, n_image, n_text)
        unwindowed = {**entry, "renormalize": "none", "apply_to_timesteps": None}     # the call is in the window
        probs[:, :, image, text] = bending.bend_probs(block, columns, (gh, gw), [unwindowed], 0, 0,
                                                      frames=frames if frames > 1 else None).view(
            len(rows), heads, n_image, n_text)
        probs = probs[:, :, image] / probs[:, :, image].sum(-1, keepdim=True)
        expected = plain.clone().view(q.shape[0], -1, heads, qh.shape[-1])
        expected[rows, image] = (probs @ vh[rows]).transpose(1, 2).to(plain.dtype)
        expected = expected.view(plain.shape)
        seen["error"] = max(seen["error"], float((out - expected).abs().max() / expected.abs().max()))
        others = [r for r in range(q.shape[0]) if r not in rows]
        assert torch.equal(out[others], plain[others]) and torch.equal(out[:, n_image:], plain[:, n_image:])
        seen["bent"] += 1

    return check


def run_check(h, config_class, unet_config, clip, latent_shape, grid, conds, n_text_of, image_first, expected_bent):
    patcher = h.random_model(config_class, unet_config)
    layout = comfy_host.dit_layout(patcher.model.diffusion_model)
    columns = comfy_host.token_columns(clip, h.PROMPT, ["sunset"], layout.text_key)
    positive, negative = conds
    run = lambda m: h.sample(m, latent_shape, positive, negative, cfg=2.0)  # noqa: E731
    seen = {"bent": 0, "other": 0, "error": 0.0}
    base = run(patcher)
    assert torch.equal(run(h.node(patcher, {"bending": [h.ENTRY]}, clip, bend1_strength=0.0)), base)
    check = bent_check(h, seen, n_text_of, columns, grid, image_first)
    change = float((run(h.recording(h.node(patcher, {"bending": [h.ENTRY]}, clip), check)) - base).abs().max())
    print(f"  {layout.kind}: columns {columns}, largest change of the sample {change:.3g}; calls {seen}")
    assert seen["bent"] == expected_bent and seen["error"] < 1e-5 and change > 0
    step1 = round(float(h.comfy.samplers.calculate_sigmas(patcher.model.model_sampling, "simple", 3)[1]), 4)
    window, seen = {**h.ENTRY, "apply_to_timesteps": [1, 1]}, {"bent": 0, "other": 0, "error": 0.0}
    check = bent_check(h, seen, n_text_of, columns, grid, image_first, window, lambda sigma: round(sigma, 4) == step1)
    run(h.recording(h.node(patcher, {"bending": [window]}, clip), check))
    print(f"  step window [1, 1]: calls {seen}")
    assert 3 * seen["bent"] == expected_bent and seen["error"] < 1e-5


def llama_conditioning(tokens):
    """conditioning_llama3 as ComfyUI's HiDreamTEModel makes it, from its own Llama code (a tiny Llama2 of 4
    layers, width 24, layer="all"): every layer's output for every token, less the embedding layer (ll_out[:, 1:])."""
    from comfy import sd1_clip
    import comfy.text_encoders.llama as cl

    config = {"vocab_size": 128300, "hidden_size": 24, "intermediate_size": 32, "num_hidden_layers": 4,
              "num_attention_heads": 2, "num_key_value_heads": 1}
    head_dim, cl.Llama2Config.head_dim = cl.Llama2Config.head_dim, 12         # a class attribute, not a field
    try:
        torch.manual_seed(3)
        model = sd1_clip.SDClipModel(layer="all", layer_idx=None, textmodel_json_config=config, model_class=cl.Llama2,
                                     special_tokens={"start": 128000, "pad": 128009}, layer_norm_hidden_state=False,
                                     enable_attention_masks=True, return_attention_masks=True, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.1)
            return model.encode_token_weights(tokens)[0][:, 1:]
    finally:
        cl.Llama2Config.head_dim = head_dim


def check_hidream(h):
    """HiDream: 2 double + 2 single blocks, each one joint call over [image; T5 (128); Llama; Llama] (the Llama
    tokens at least 128, encoded by ComfyUI's own Llama code), all bent, blocks told by call order. Latent 9 × 12:
    padded to the patch, a 5 × 6 grid."""
    clip = hidream_clip()
    tokens = clip.tokenize(h.PROMPT.replace("{", "").replace("}", ""))
    t5, llama = len(tokens["t5xxl"][0]), len(tokens["llama"][0])
    conditioning = llama_conditioning(tokens["llama"])
    assert conditioning.shape == (1, 4, llama, 24)                  # every Llama token is a key: none dropped
    g = torch.Generator().manual_seed(1)

    def cond():
        extra = {"pooled_output": torch.randn(1, 32, generator=g), "conditioning_llama3": conditioning}
        return [[torch.randn(1, t5, 32, generator=g), extra]]

    n_text = t5 + 2 * llama
    run_check(h, h.comfy.supported_models.HiDream, HIDREAM, clip, (1, 16, 9, 12), (1, 5, 6), (cond(), cond()),
              lambda n_keys: n_text if n_keys == 30 + n_text else None, True, 4 * 3)


def check_cosmos(h):
    """Cosmos Predict2: 2 blocks, each a self-attention (not bent) then the cross-attention to T5's 512 tokens
    (bent); blocks told by call order. Latent 2 frames × 8 × 12, patch (1, 2, 2)."""
    import comfy.text_encoders.cosmos as tc
    clip = Clip(tc.CosmosT5Tokenizer())
    g = torch.Generator().manual_seed(1)
    conds = [[[torch.randn(1, 512, 32, generator=g), {}]] for _ in range(2)]
    run_check(h, h.comfy.supported_models.CosmosT2IPredict2, COSMOS, clip, (1, 16, 2, 8, 12), (2, 4, 6), conds,
              lambda n_keys: 512 if n_keys == 512 else None, False, 2 * 3)


def check_ltxv(h):
    """LTX-Video: 2 blocks behind "dit" replaces, attn1 (not bent) then attn2 to T5's 128 tokens under the text
    mask of the 9 real ones (bent); the latent's (frames, rows, cols) are the tokens (patch 1)."""
    import comfy.text_encoders.lt as lt
    clip = Clip(lt.LTXVT5Tokenizer())
    g = torch.Generator().manual_seed(1)
    mask = (torch.arange(128) < 9).long()[None]
    conds = [[[torch.randn(1, 128, 32, generator=g), {"attention_mask": mask}]] for _ in range(2)]
    run_check(h, h.comfy.supported_models.LTXV, LTXV, clip, (1, 128, 2, 4, 6), (2, 4, 6), conds,
              lambda n_keys: 128 if n_keys == 128 else None, False, 2 * 3)


def checks(h):
    """{name: check} for check-comfyui, h its namespace (random_model, node, sample, recording, ENTRY, PROMPT)."""
    h = types.SimpleNamespace(**h)
    return {"hidream": lambda: check_hidream(h), "cosmos": lambda: check_cosmos(h), "ltxv": lambda: check_ltxv(h)}
