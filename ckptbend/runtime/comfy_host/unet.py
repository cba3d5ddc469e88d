"""SAG, Slothful Attention and Attention Bending on ComfyUI's UNets (SD 1.x/2.x, SDXL): attn1 / attn2 patches
and replaces, and a post-CFG function."""

from __future__ import annotations

from typing import Mapping

from .. import bending, bent_attention, sag, slothful, tokens
from .common import SAG_PASS, chunk_rows, grid_hw, host_attention, per_head


def is_unet(diffusion_model) -> bool:
    return hasattr(diffusion_model, "input_blocks")


# ComfyUI builds SVD (SVD_img2vid, SV3D) as a UNetModel with use_temporal_resblock. Run in ComfyUI 0.3.64, SAG fails
# on it (ComfyUI's own SAG node too) and so does Slothful, at the temporal blocks' self-attention over frames.
SVD_REFUSAL = ("ckptbend's sampling-time techniques do not reach SVD: its cross-attention attends to the CLIP image "
               "embedding, not to a prompt (Attention Bending), and its temporal blocks' self-attention runs over "
               "frames, not the image grid (SAG, Slothful Attention)")


def is_svd(diffusion_model) -> bool:
    return bool(getattr(diffusion_model, "use_temporal_resblocks", False))


# --- SAG -----------------------------------------------------------------------------------------

def patch_sag(m, scale: float, blur_sigma: float) -> None:
    # Closures, not objects: ComfyUI deep-copies model_options on clone, and both functions must
    # keep sharing this state.
    state: dict = {}

    def record(q, k, v, extra):
        cond_or_uncond, heads = extra["cond_or_uncond"], extra["n_heads"]
        if 1 in cond_or_uncond and not extra.get(SAG_PASS):
            # The unconditional chunk's probabilities [b·heads, n, n], computed beside the usual
            # attention, whose output stays the unpatched model's.
            rows = chunk_rows(cond_or_uncond, 1, q.shape[0])
            grid = grid_hw(extra)
            if grid is not None and grid[0] * grid[1] != k.shape[1]:
                grid = None     # keys reduced by Slothful (keep_middle off): ComfyUI's guess, as its node
            state.update(probs=bent_attention.attention_probs(q[rows], k[rows], heads), heads=heads, mid_hw=grid)
        return host_attention(q, k, v, heads, extra)

    def post_cfg(args):
        probs = state.pop("probs", None)       # this step's map, used once
        if probs is None:
            return args["denoised"]
        import comfy.samplers                  # only inside ComfyUI (or a stand-in)

        options = dict(args["model_options"])
        options["transformer_options"] = {**options.get("transformer_options", {}), SAG_PASS: True}

        def uncond_x0_at(x_degraded):
            return comfy.samplers.calc_cond_batch(args["model"], [args["uncond"]], x_degraded,
                                                  args["sigma"], options)[0]

        return sag.sag_step(args["input"], args["denoised"], args["uncond_denoised"], probs, state["heads"],
                            uncond_x0_at, scale=scale, blur_sigma=blur_sigma, mid_hw=state["mid_hw"])

    m.set_model_attn1_replace(record, "middle", 0, 0)
    m.set_model_sampler_post_cfg_function(post_cfg, disable_cfg1_optimization=True)


# --- Slothful Attention ---------------------------------------------------------------------------

def patch_slothful(m, params: dict) -> None:
    def reduce_kv(q_in, k_in, v_in, extra):
        k, v = slothful.slothful_kv(k_in, v_in, extra["block"][0], extra["sigmas"][0], extra["n_heads"],
                                    tuple(extra["original_shape"][-2:]), params)
        return q_in, k, v

    m.set_model_attn1_patch(reduce_kv)


# --- Attention Bending ------------------------------------------------------------------------------

def cross_attention_sites(diffusion_model) -> list[tuple[str, int, int]]:
    """(block_name, number, transformer index) of every cross-attention, in bending.md's layer order:
    input blocks, middle, output blocks, each by block number, then transformer index. Read from
    ComfyUI's UNet structure: input_blocks / middle_block / output_blocks, whose SpatialTransformers
    hold transformer_blocks with an attn2."""
    if not hasattr(diffusion_model, "input_blocks"):
        raise ValueError("Attention Bending needs a UNet (input_blocks / middle_block / output_blocks); "
                         f"this model's diffusion_model is a {type(diffusion_model).__name__}")
    middle = getattr(diffusion_model, "middle_block", None)
    groups = (("input", list(diffusion_model.input_blocks)), ("middle", [] if middle is None else [middle]),
              ("output", list(diffusion_model.output_blocks)))
    sites = []
    for name, blocks in groups:
        for number, block in enumerate(blocks):
            for layer in block:
                for index, tb in enumerate(getattr(layer, "transformer_blocks", ())):
                    if getattr(tb, "attn2", None) is not None:
                        sites.append((name, number, index))
    return sites


def patch_bending(m, specs: list, columns: Mapping, steps) -> None:
    """UNet: an attn2 replace at every cross-attention site an entry may act on."""
    sites = cross_attention_sites(m.model.diffusion_model)
    for layer, (name, number, index) in enumerate(sites):
        if any(s.apply_to_layers is None or layer in s.apply_to_layers for s in specs):
            m.set_model_attn2_replace(_bend_site(specs, columns, layer, steps), name, number, index)


def _bend_site(specs: list, columns: Mapping, layer: int, steps):
    def bend(q, k, v, extra):
        heads = extra["n_heads"]
        step = steps(extra)
        active = bending.active_entries(specs, step, layer)
        out = host_attention(q, k, v, heads, extra)
        rows = chunk_rows(extra["cond_or_uncond"], 0, q.shape[0])
        if not active or not rows or extra.get(SAG_PASS):
            return out
        last = max(j for s in active for j in tokens.columns_for(s.token, columns, k.shape[1]))
        if last >= k.shape[1]:
            raise ValueError(f"Attention Bending: token column {last} lies beyond the {k.shape[1]} text tokens "
                             "the model sees; is bending_prompt the prompt you encode?")
        # Only the conditional chunks are bent: the host's output plus the bent columns' correction.
        grid = grid_hw(extra) or bending.grid_for(q.shape[1], tuple(extra["original_shape"][-2:]))
        bent_attention.bend_rows(*(per_head(t, heads) for t in (out, q, k, v)), rows, entries=active,
                          token_indices=columns, grid_hw=grid, step_index=step, layer_index=layer)
        return out

    return bend
