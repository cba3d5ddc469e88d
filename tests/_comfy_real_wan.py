"""bin/check-comfyui's Wan checks on ComfyUI's own WanModel (comfy.supported_models.WAN21_T2V / WAN21_I2V, tiny and
random), sampled by comfy.sample with cond and uncond batched. `host` is bin/check-comfyui's namespace (its comfy,
random_model, node, recording, sample, contexts, explicit_bent, ENTRY, PROMPT).

- wan, wan-i2v: every text cross-attention equals an explicit bent softmax on the positive rows; the negative rows,
  the self-attention and I2V's image call are the backend's output bit for bit.
- wan22: two experts over two slices of one schedule: a step window across the switch bends exactly its steps.
- wan-extra-tokens: Fun Control's reference image (tokens before the video's) and Phantom's time_dim_concat frames
  (after): only the video's positive query rows are bent.
"""

import types

import torch

import comfy_standin as cs
from _pipelines import t5_like_tokenizer
from ckptbend.runtime import comfy_host


WAN = {"image_model": "wan2.1", "patch_size": (1, 2, 2), "text_len": 512, "in_dim": 16, "dim": 32, "ffn_dim": 64,
       "freq_dim": 256, "text_dim": 32, "out_dim": 16, "num_heads": 2, "num_layers": 2, "eps": 1e-6}


def wan_text_check(host, text, frames, h, w, seen, bent_at=lambda sigma: True):
    """check() for recording(): a Wan text cross-attention (k of `text` tokens) at a step bent_at(sigma)
    equals the explicit bent softmax on the positive rows; every other call (other steps, self-attention,
    I2V's CLIP-image call) is the backend's output, bit for bit."""

    def check(q, k, v, heads, out, plain, options, mask):
        sigma = float(options["sigmas"][0])
        if k.shape[1] != text or not bent_at(sigma):
            assert torch.equal(out, plain), "a call that is not a bent text cross-attention changed"
            seen["other"] += 1
            return
        chunks = options["cond_or_uncond"]
        per = q.shape[0] // len(chunks)
        rows = [c * per + i for c, kind in enumerate(chunks) if kind == 0 for i in range(per)]
        qh, kh, vh = (t.float() for t in cs._heads_first(q, k, v, heads))
        probs = host.explicit_bent(torch.softmax(qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5, -1)[rows], text,
                              (h // 2, w // 2), frames)
        expected = plain.clone()
        expected[rows] = (probs @ vh[rows]).transpose(1, 2).flatten(2).to(plain.dtype)
        seen["error"] = max(seen["error"], float((out - expected).abs().max()))
        seen["bent"] += 1
        seen.setdefault("sigmas", set()).add(round(sigma, 4))

    return check


def check_wan(host, i2v=False):
    text, frames, h, w = 16, 2, 8, 8
    config = host.comfy.supported_models.WAN21_I2V if i2v else host.comfy.supported_models.WAN21_T2V
    patcher = host.random_model(config, {**WAN, "model_type": "i2v" if i2v else "t2v", "in_dim": 36 if i2v else 16})
    clip = cs.T5CLIP(t5_like_tokenizer(), key="umt5xxl", min_length=text)
    cond, uncond = host.contexts(text, text)
    # I2V: CLIP-vision tokens for the image call; the concatenated image latent defaults to zeros
    extra = {"clip_vision_output": types.SimpleNamespace(penultimate_hidden_states=host.contexts(257, width=1280)[0])}
    extra = extra if i2v else {}
    run = lambda m: host.sample(m, (1, 16, frames, h, w), [[cond, extra]], [[uncond, extra]])  # noqa: E731
    seen = {"bent": 0, "other": 0, "error": 0.0}
    base = run(patcher)
    assert torch.equal(run(host.node(patcher, {"bending": [host.ENTRY]}, clip, bend1_strength=0.0)), base)
    bent = host.node(patcher, {"bending": [host.ENTRY]}, clip)
    change = float((run(host.recording(bent, wan_text_check(host, text, frames, h, w, seen))) - base).abs().max())
    seen.pop("sigmas", None)
    print(f"  largest change of the sample {change:.3g}; calls {seen}")
    assert seen["bent"] == 2 * 3 and seen["other"] == 2 * 3 * (2 if i2v else 1) and seen["error"] < 1e-4


def check_wan_extra_tokens(host):
    """Wan 2.2 Fun Control's reference image (reference_latents: a WanModel with ref_conv puts its tokens before the
    video's) and Phantom's subject images (time_dim_concat: frames after the video's), through ComfyUI's own
    extra_conds and WanModel: only the video's query rows of the positive text cross-attention are bent (the
    explicit bent softmax on the video grid), the reference / subject rows and every other call stay ComfyUI's own."""
    text, frames, h, w = 16, 2, 8, 8
    patcher = host.random_model(host.comfy.supported_models.WAN21_T2V,
                                {**WAN, "model_type": "t2v", "in_dim_ref_conv": 16})
    clip = cs.T5CLIP(t5_like_tokenizer(), key="umt5xxl", min_length=text)
    cond, uncond = host.contexts(text, text)
    image = torch.randn(1, 16, 1, h, w, generator=torch.Generator().manual_seed(4))
    n_video, n_frame = frames * (h // 2) * (w // 2), (h // 2) * (w // 2)
    for name, extra, first in (("reference image", {"reference_latents": [image]}, n_frame),
                               ("time_dim_concat", {"time_dim_concat": image}, 0)):
        seen = {"bent": 0, "other": 0, "error": 0.0}

        def check(q, k, v, heads, out, plain, options, mask):
            if k.shape[1] != text:
                assert torch.equal(out, plain), "a call that is not a text cross-attention changed"
                seen["other"] += 1
                return
            assert q.shape[1] == n_video + n_frame, q.shape           # the extra frame's tokens are there
            chunks = options["cond_or_uncond"]
            per = q.shape[0] // len(chunks)
            rows = [c * per + i for c, kind in enumerate(chunks) if kind == 0 for i in range(per)]
            video = slice(first, first + n_video)
            qh, kh, vh = (t.float() for t in cs._heads_first(q[:, video], k, v, heads))
            probs = host.explicit_bent(torch.softmax(qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5, -1)[rows], text,
                                  (h // 2, w // 2), frames)
            expected = plain.clone()
            expected[rows, video] = (probs @ vh[rows]).transpose(1, 2).flatten(2).to(plain.dtype)
            seen["error"] = max(seen["error"], float((out - expected).abs().max()))
            seen["bent"] += 1

        run = lambda m: host.sample(m, (1, 16, frames, h, w), [[cond, extra]], [[uncond, extra]])   # noqa: E731
        base = run(patcher)
        bent = host.node(patcher, {"bending": [host.ENTRY]}, clip)
        change = float((run(host.recording(bent, check)) - base).abs().max())
        print(f"  {name}: largest change of the sample {change:.3g}; calls {seen}")
        assert seen["bent"] == 2 * 3 and seen["error"] < 1e-4 and change > 1e-4


def check_wan22(host):
    """Wan 2.2 A14B: two experts, each sampled by its own KSamplerAdvanced over a slice of one 4-step schedule
    (steps 0–1, then 2–3 without new noise). A window [1, 2] spanning the switch bends step 1 on the
    first expert and step 2 on the second, nothing else."""
    text, frames, h, w = 16, 2, 8, 8
    high, low = (host.random_model(host.comfy.supported_models.WAN21_T2V, {**WAN, "model_type": "t2v"})
                 for _ in range(2))
    with torch.no_grad():                               # a second expert with other weights
        for p in low.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    clip = cs.T5CLIP(t5_like_tokenizer(), key="umt5xxl", min_length=text)
    cond, uncond = host.contexts(text, text)
    shape = (1, 16, frames, h, w)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(2))

    def advanced(m, latent, start, last, add_noise):
        return host.comfy.sample.sample(m, noise if add_noise else torch.zeros(shape), 4, 5.0, "euler", "simple",
                                   [[cond, {}]], [[uncond, {}]], latent, start_step=start, last_step=last,
                                   force_full_denoise=False, disable_pbar=True, seed=0)

    (cls,) = comfy_host.node_class_mappings({"bending": [{**host.ENTRY, "apply_to_timesteps": [1, 2]}]}, "check",
                                            "cd" * 32)[0].values()
    m1, m2 = getattr(cls(), cls.FUNCTION)(model=high, model_2=low, bending_clip=clip, bending_prompt=host.PROMPT)
    schedule = host.comfy.samplers.calculate_sigmas(high.model.model_sampling, "simple", 4)
    window = {round(float(schedule[i]), 4) for i in (1, 2)}
    bent_at = lambda sigma: round(sigma, 4) in window  # noqa: E731
    seen = [{"bent": 0, "other": 0, "error": 0.0}, {"bent": 0, "other": 0, "error": 0.0}]
    host.recording(m1, wan_text_check(host, text, frames, h, w, seen[0], bent_at))
    host.recording(m2, wan_text_check(host, text, frames, h, w, seen[1], bent_at))
    advanced(m2, advanced(m1, torch.zeros(shape), 0, 2, True), 2, 4, False)
    for expert, calls in zip(("high-noise", "low-noise"), seen):
        print(f"  {expert} expert: bent at sigmas {sorted(calls.get('sigmas', ()))} of the schedule "
              f"{[round(float(x), 4) for x in schedule]}; calls {calls['bent']} bent, {calls['other']} not; "
              f"error {calls['error']:.3g}")
    assert [sorted(calls.get("sigmas", ())) for calls in seen] == [[round(float(schedule[1]), 4)],
                                                                   [round(float(schedule[2]), 4)]]
    assert all(calls["bent"] == 2 for calls in seen) and max(calls["error"] for calls in seen) < 1e-4


def checks(h):
    """{name: check} for check-comfyui, h its namespace."""
    h = types.SimpleNamespace(**h)
    return {"wan": lambda: check_wan(h), "wan-i2v": lambda: check_wan(h, i2v=True), "wan22": lambda: check_wan22(h),
            "wan-extra-tokens": lambda: check_wan_extra_tokens(h)}
