"""bin/check-comfyui's mochi, auraflow and hunyuan-video checks: the node's Attention Bending on tiny random Mochi,
AuraFlow and HunyuanVideo 1.0 models built by the real ComfyUI's own classes (comfy.supported_models), words found by
its own tokenizers (Mochi's T5, AuraFlow's Pile-T5; HunyuanVideo's template code), sampled by comfy.sample with cfg.
Every positive joint call's image queries equal the explicit bent softmax; the text queries and the negative rows
are the backend's output bit for bit; strength 0 and a step window past the last step sample bit-identically. `h` is
bin/check-comfyui's module (its random_model, node, recording, sample, ENTRY, PROMPT)."""

import types

import torch

from ckptbend.runtime import bending, comfy_host


def _clip(tokenizer):
    return types.SimpleNamespace(tokenize=tokenizer.tokenize_with_weights)   # what comfy.sd.CLIP.tokenize does


def _checker(entry, text, queries, grid, columns, seen, total):
    """check() for h.recording: q, k, v arrive per head [B, heads, L, d] (the models pass skip_reshape); a call of
    `total` tokens is joint."""
    frames, rows_, cols_ = grid

    def check(q, k, v, heads, out, plain, options, mask):
        chunks = options["cond_or_uncond"]
        per = q.shape[0] // len(chunks)
        rows = [c * per + i for c, kind in enumerate(chunks) if kind == 0 for i in range(per)]
        if not rows or q.shape[2] != total:                 # a negative-only call; HunyuanVideo's token refiner
            assert torch.equal(out, plain)
            seen["plain"] += 1
            return
        qh, kh, vh = q.float(), k.float(), v.float()
        assert mask is None
        probs = torch.softmax(qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5, -1)[rows]
        block = probs[:, :, queries, text]
        n_q, n_t = block.shape[-2:]
        bent = bending.bend_probs(block.reshape(-1, n_q, n_t), columns, (rows_, cols_),
                                  [{**entry, "renormalize": "none"}], 0, 0, frames=frames if frames > 1 else None)
        probs[:, :, queries, text] = bent.view(len(rows), -1, n_q, n_t)
        image = (probs[:, :, queries] / probs[:, :, queries].sum(-1, keepdim=True)) @ vh[rows]
        expected = plain.clone().view(q.shape[0], -1, heads, qh.shape[-1])
        expected[rows, queries] = image.transpose(1, 2).to(plain.dtype)
        expected = expected.view(plain.shape)
        seen["error"] = max(seen["error"], float((out - expected).abs().max() / expected.abs().max()))
        others = [r for r in range(q.shape[0]) if r not in rows]
        untouched = [j for j in range(q.shape[2]) if j not in range(q.shape[2])[queries]]
        assert torch.equal(out[others], plain[others]) and torch.equal(out[:, untouched], plain[:, untouched])
        seen["bent"] += 1
        seen["batched"] += len(chunks) > 1

    return check


def _columns(h, clip, layout, piece):
    """The node's columns of "sunset", checked independently: the tokens there spell the word; so do the words of
    check-comfyui's token prompts (emphasis, escapes, a long prompt, words right after punctuation)."""
    def spelled(prompt, words):
        columns = comfy_host.token_columns(clip, prompt, words, layout.text_key)
        ids = [t[0] for t in clip.tokenize(prompt.replace("{", "").replace("}", ""))[layout.text_key][0]]
        for word in words:
            assert "".join(piece(ids[j]) for j in columns[word]).replace("\u2581", "") == word, (prompt, columns)
        return columns

    for prompt, words, _skip in h.TOKEN_PROMPTS:
        spelled(prompt, words)
    return spelled(h.PROMPT, ["sunset"])


def _bend(h, patcher, clip, run, layout, columns, text, queries, grid, bent_calls, total):
    """The common part: strength 0 and a window past the last step bit-identical, each call checked."""
    seen = {"bent": 0, "plain": 0, "batched": 0, "error": 0.0}
    base = run(patcher)
    assert torch.equal(run(h.node(patcher, {"bending": [h.ENTRY]}, clip, bend1_strength=0.0)), base)
    late = {**h.ENTRY, "apply_to_timesteps": [5, 9]}
    assert torch.equal(run(h.node(patcher, {"bending": [late]}, clip)), base)
    check = _checker(h.ENTRY, text, queries, grid, columns, seen, total)
    bent = run(h.recording(h.node(patcher, {"bending": [h.ENTRY]}, clip), check))
    change = float((bent - base).abs().max())
    print(f"  {layout.kind}: columns {columns}, largest change of the sample {change:.3g} "
          f"(of {float(base.abs().max()):.3g}); calls {seen}")
    assert seen["bent"] == bent_calls and seen["error"] < 1e-5 and change > 0
    return seen


def check_mochi(h):
    """Mochi (comfy.ldm.genmo AsymmDiTJoint, 2 blocks, 2 heads × 16): [video; T5 cropped to num_tokens]. The prompt's
    T5 mask from ComfyUI's own Mochi tokenizer gives num_tokens; a negative of the same length is batched with the
    positive (one call), a shorter one runs alone (ComfyUI batches only equal num_tokens)."""
    import comfy.supported_models
    import comfy.text_encoders.genmo

    patcher = h.random_model(comfy.supported_models.GenmoMochi, {
        "image_model": "mochi_preview", "depth": 2, "patch_size": 2, "num_heads": 2, "hidden_size_x": 32,
        "hidden_size_y": 32, "mlp_ratio_x": 384.0, "mlp_ratio_y": 4.0, "learn_sigma": False, "in_channels": 12,
        "qk_norm": True, "qkv_bias": False, "out_bias": True, "attn_drop": 0.0, "patch_embed_bias": True,
        "posenc_preserve_area": True, "timestep_mlp_bias": True, "attend_to_padding": False, "timestep_scale": 1000.0,
        "use_t5": True, "t5_feat_dim": 32, "t5_token_length": 256, "rope_theta": 10000.0})
    layout = comfy_host.dit_layout(patcher.model.diffusion_model)
    tokenizer = comfy.text_encoders.genmo.MochiT5Tokenizer()
    clip = _clip(tokenizer)
    columns = _columns(h, clip, layout, tokenizer.clip_t5xxl.tokenizer.convert_ids_to_tokens)
    ids = [t[0] for t in clip.tokenize(h.PROMPT.replace("{", "").replace("}", ""))["t5xxl"][0]]
    n_text = len(ids) - ids[::-1].index(1)                 # through </s>: the tokens ComfyUI's mask keeps
    frames, height, width = 2, 8, 12
    grid = (frames, height // 2, width // 2)
    n_image = grid[0] * grid[1] * grid[2]
    cond, = h.contexts(len(ids), width=32)
    g = torch.Generator().manual_seed(3)
    uncond = torch.randn(1, len(ids), 32, generator=g)

    def masked(n):
        return (torch.arange(len(ids)) < n).long()[None]

    for n_negative, calls in ((n_text, 6), (n_text - 2, 6)):
        def run(m, n_negative=n_negative):
            return h.sample(m, (1, 12, frames, height, width), [[cond, {"attention_mask": masked(n_text)}]],
                            [[uncond, {"attention_mask": masked(n_negative)}]], cfg=2.0)

        text, queries = slice(n_image, n_image + n_text), slice(0, n_image)
        seen = _bend(h, patcher, clip, run, layout, columns, text, queries, grid, calls, n_image + n_text)
        assert seen["batched"] == (calls if n_negative == n_text else 0)


def check_auraflow(h):
    """AuraFlow (comfy.ldm.aura MMDiT, 2 double and 1 single layer, 2 heads × 16): [8 registers; Pile-T5; image],
    the Pile-T5 tokens (padded to 256) from ComfyUI's own AuraFlow tokenizer; cond and uncond batched."""
    import comfy.supported_models
    import comfy.text_encoders.aura_t5

    patcher = h.random_model(comfy.supported_models.AuraFlow, {
        "cond_seq_dim": 32, "max_seq": 64, "patch_size": 2, "dim": 32, "n_layers": 3, "n_double_layers": 2,
        "n_heads": 2, "global_conddim": 32, "in_channels": 4, "out_channels": 4})
    layout = comfy_host.dit_layout(patcher.model.diffusion_model)
    tokenizer = comfy.text_encoders.aura_t5.AuraT5Tokenizer()
    clip = _clip(tokenizer)
    columns = _columns(h, clip, layout, tokenizer.clip_pile_t5xl.tokenizer.tokenizer.id_to_piece)
    n_text = len(clip.tokenize(h.PROMPT)["pile_t5xl"][0])
    height, width = 8, 12
    grid = (1, height // 2, width // 2)
    cond, uncond = h.contexts(n_text, n_text, width=32)
    run = lambda m: h.sample(m, (1, 4, height, width), [[cond, {}]], [[uncond, {}]], cfg=2.0)   # noqa: E731
    registers = layout.registers
    seen = _bend(h, patcher, clip, run, layout, columns, slice(registers, registers + n_text),
                 slice(registers + n_text, None), grid, 3 * 3, registers + n_text + grid[1] * grid[2])
    assert registers == 8 and seen["batched"] == 9


def _hunyuan_context(hv, tokenizer, prompt, **i2v):
    """What the model's context holds, row by row, for `prompt` tokenised by ComfyUI's HunyuanVideoTokenizer (i2v: its
    image-to-video template and image embeddings): ComfyUI's own HunyuanVideoClipModel.encode_token_weights run on
    row labels, a token's id or None for an image embedding's rows."""
    tokens = tokenizer.tokenize_with_weights(prompt, **i2v)
    labels = []
    for t in tokens["llama"][0]:
        labels += [None] * t[0]["data"].shape[0] if isinstance(t[0], dict) else [t[0]]
    rows = torch.arange(len(labels), dtype=torch.float32).view(1, -1, 1)
    encoder = types.SimpleNamespace(
        llama=types.SimpleNamespace(encode_token_weights=lambda pairs: (rows, None, {
            "attention_mask": torch.ones(1, len(labels))})),
        clip_l=types.SimpleNamespace(encode_token_weights=lambda pairs: (None, None)))
    return [labels[int(r)] for r in hv.HunyuanVideoClipModel.encode_token_weights(encoder, tokens)[0][0, :, 0]]


def check_hunyuan_video(h):
    """HunyuanVideo 1.0 (comfy.ldm.hunyuan_video without ByT5: 2 double and 1 single block, 2 heads × 16): [video;
    the Llama 3 tokens kept]. The prompt is laid out by ComfyUI's own HunyuanVideoTokenizer (its template, its
    weights parsing) over a Llama-3-like vocabulary (tests/comfy_standin_hunyuan_video.py: the Llama 3 vocabulary
    file is not in the unpacked 0.3.64); which tokens the model sees is read from ComfyUI's own
    HunyuanVideoClipModel.encode_token_weights, independently of the node's rule. Also as TextEncodeHunyuanVideo_
    ImageToVideo encodes it: its template and 6 image embedding rows, interleave 2, whose 3 rows come first."""
    import comfy.supported_models
    import comfy.text_encoders.hunyuan_video as hv
    import comfy_standin_hunyuan_video as chv
    from comfy_extras.nodes_hunyuan import PROMPT_TEMPLATE_ENCODE_VIDEO_I2V

    class Llama:                                          # LlamaTokenizerFast.from_pretrained → the stand-in vocabulary
        @staticmethod
        def from_pretrained(path, **kwargs):
            return chv.llama_tokenizer()

    hv.LlamaTokenizerFast = Llama
    tokenizer = hv.HunyuanVideoTokenizer()
    clip = _clip(tokenizer)
    patcher = h.random_model(comfy.supported_models.HunyuanVideo, {
        "image_model": "hunyuan_video", "in_channels": 16, "patch_size": [1, 2, 2], "out_channels": 16,
        "vec_in_dim": 32, "axes_dim": [4, 6, 6], "meanflow": False, "context_in_dim": 32, "hidden_size": 32,
        "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 1, "theta": 256, "qkv_bias": True,
        "byt5": False, "guidance_embed": False})
    layout = comfy_host.dit_layout(patcher.model.diffusion_model)
    columns = comfy_host.token_columns(clip, h.PROMPT, ["sunset"], layout.text_key)
    text = h.PROMPT.replace("{", "").replace("}", "")
    i2v = {"llama_template": PROMPT_TEMPLATE_ENCODE_VIDEO_I2V, "image_embeds": torch.zeros(1, 6, 32),
           "image_interleave": 2}
    for name, context in (("t2v", _hunyuan_context(hv, tokenizer, text)),
                          ("i2v", _hunyuan_context(hv, tokenizer, text, **i2v))):
        images = context.count(None)
        assert context[:images] == [None] * images and (images == 3) == (name == "i2v")
        prompt = context[images:]
        assert tokenizer.llama.tokenizer.convert_ids_to_tokens([prompt[j] for j in columns["sunset"]]) == ["sunset"]
        n_text, (frames, height, width) = len(context), (2, 8, 12)
        grid = (frames, height // 2, width // 2)
        n_image = grid[0] * grid[1] * grid[2]
        cond, uncond = h.contexts(n_text, n_text, width=32)
        pooled = {"pooled_output": torch.zeros(1, 32)}
        run = lambda m: h.sample(m, (1, 16, frames, height, width), [[cond, dict(pooled)]],  # noqa: E731
                                 [[uncond, dict(pooled)]], cfg=2.0)
        print(f"  {name}: {images} image rows, then {len(prompt)} prompt tokens")
        seen = _bend(h, patcher, clip, run, layout, columns, slice(n_image + images, n_image + n_text),
                     slice(0, n_image), grid, 3 * 3, n_image + n_text)
        assert seen["batched"] == 9 and seen["plain"] == 2 * 3      # the token refiner's two blocks, each step
