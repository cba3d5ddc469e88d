"""Attention Bending on Kandinsky 5 in the diffusers host: diffusers' own Kandinsky5Transformer3DModel (tiny, seeded)
driven as Kandinsky5T2VPipeline drives it (channels-last latents, CFG as two calls), with its visual tokens in grid
order (regular attention) and in fractal 8×8-block order (nabla attention, its sparse self-attention on diffusers'
flex backend).

The reference is the model's own processors with their attention call replaced by an explicit softmax whose
cross-attention probabilities (visual queries × Qwen text keys) are bent by bending.bend_probs in grid order, rows
renormalised: every bent call equals it; the negative call, strength 0 and calls outside the step window are
bit-identical. The word's columns: the pipeline's own template through a Qwen2 tokenizer, less its first 128 tokens."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Kandinsky5T2VPipeline
from diffusers.models.transformers import transformer_kandinsky as tk

import comfy_standin_qwen as cq
from ckptbend.runtime import bending
from ckptbend.runtime import diffusers_host as dh
from ckptbend.runtime.diffusers_host import prompts
from ckptbend.synth import kandinsky5 as K

N_TEXT, COLUMNS = 6, {"sunset": [2, 3]}
ENTRY = {"token": "sunset", "mode": "translate", "translate_x": 0.5}
GRIDS = {"regular": (2, 3, 4), "fractal": (1, 16, 16)}          # token (frames, rows, columns); patch (1, 2, 2)
NABLA = dict(attention_type="nabla", attention_P=0.9, attention_wT=3, attention_wH=3, attention_wW=3)

pytestmark = pytest.mark.usefixtures("one_thread_no_grad")


def tiny(kind):
    with torch.random.fork_rng():
        torch.manual_seed(5)
        model = tk.Kandinsky5Transformer3DModel(**K.CONFIGS["kandinsky5"], **(NABLA if kind == "fractal" else {}))
        for name, p in model.named_parameters():
            # structured maps, not near-uniform; not near-one-hot either (at 1.5 to 3, rows whose mass the bend
            # moves off the word leave the float32 correction ~1e-4 off the explicit softmax)
            if name.endswith(("query_norm.weight", "key_norm.weight")):
                p.data.uniform_(1.0, 1.5)
            elif "modulation" in name:         # zero-initialised: every block's gate would be 0
                p.data.normal_(0.0, 0.2)
    if kind == "fractal":            # nabla's block mask runs on diffusers' flex backend, as the model needs
        for block in model.visual_transformer_blocks:
            block.self_attention.processor._attention_backend = "flex"
    return model.eval()


@pytest.fixture(scope="module", params=list(GRIDS))
def kandinsky(request):
    kind = request.param
    model = tiny(kind)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=10.0)
    scheduler.set_timesteps(2)
    pipe = Kandinsky5T2VPipeline(transformer=model, vae=None, text_encoder=None, tokenizer=cq.qwen_tokenizer(),
                                 text_encoder_2=None, tokenizer_2=None, scheduler=scheduler)
    frames, rows, cols = GRIDS[kind]
    g = torch.Generator().manual_seed(8)
    latents = torch.randn(1, frames, rows * 2, cols * 2, 4, generator=g)
    sparse = None
    if kind == "fractal":
        sta = Kandinsky5T2VPipeline.fast_sta_nabla(frames, rows // 8, cols // 8, 3, 3, 3, device="cpu")
        sparse = {"sta_mask": sta[None, None], "to_fractal": True, "P": 0.9}
    inputs = dict(hidden_states=latents, pooled_projections=torch.randn(1, 20, generator=g), sparse_params=sparse,
                  visual_rope_pos=[torch.arange(n) for n in (frames, rows, cols)], text_rope_pos=torch.arange(N_TEXT))
    texts = torch.randn(2, N_TEXT, 24, generator=g)                  # the prompt's, the negative prompt's
    return kind, model, pipe, inputs, texts


def run(kandinsky, text, step=0, dynamic=None):
    """One call as the pipeline makes it; with `dynamic`, applied with the prompt's embeddings as the encoded one."""
    kind, model, pipe, inputs, texts = kandinsky
    if dynamic is not None:
        session = dh.apply(pipe, dynamic)
        session.token_indices, session.prompt_embeds = COLUMNS, texts[:1]
    try:
        return model(**inputs, encoder_hidden_states=text, timestep=pipe.scheduler.timesteps[step:step + 1]).sample
    finally:
        dh.remove(pipe)


def explicit_bent(kind, entry):
    """dispatch_attention_fn with the cross-attention's probabilities bent in grid order (diffusers' own
    fractal_flatten gives the model's order of the grid's tokens); other calls as the model makes them."""
    spec = bending.BendSpec.from_dict({**entry, "renormalize": "none"})
    frames, rows, cols = GRIDS[kind]
    grid = torch.arange(frames * rows * cols, dtype=torch.float32).view(1, frames, rows, cols, 1)
    order = tk.fractal_flatten(grid, grid, grid.shape[:-1], block_mask=kind == "fractal")[0].flatten().long()
    own = tk.dispatch_attention_fn

    def attend(query, key, value, attn_mask=None, **kwargs):
        if not (query.shape[1] == len(order) and key.shape[1] == N_TEXT):
            return own(query, key, value, attn_mask=attn_mask, **kwargs)
        q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        in_grid = torch.empty_like(probs)
        in_grid[:, :, order] = probs
        bent = bending.bend_probs(in_grid[0], COLUMNS, (rows, cols), [spec], frames=frames)
        bent = bent / bent.sum(-1, keepdim=True)
        return (bent[None, :, order] @ v).transpose(1, 2).to(query.dtype)

    return attend


def test_every_bent_call_is_the_explicit_bent_softmax(kandinsky, monkeypatch):
    """Each cross-attention call of a bent run, against the same module on the same input with the explicit bent
    softmax; the whole sample too in grid order (nabla's block mask is picked from the data by a threshold, so a
    bent sample is not compared end to end in fractal order)."""
    kind, model, pipe, inputs, texts = kandinsky
    calls = []
    hooks = [b.cross_attention.register_forward_hook(
        lambda m, args, kwargs, out: calls.append((m, args[0], kwargs["encoder_hidden_states"], out)), with_kwargs=True)
        for b in model.visual_transformer_blocks]
    try:
        bent = run(kandinsky, texts[:1], dynamic={"bending": [ENTRY]})
    finally:
        for h in hooks:
            h.remove()
    monkeypatch.setattr(tk, "dispatch_attention_fn", explicit_bent(kind, ENTRY))
    assert len(calls) == 2
    for module, hidden, context, out in calls:
        torch.testing.assert_close(out, module(hidden, encoder_hidden_states=context), rtol=1e-4, atol=1e-5)
    if kind == "regular":
        torch.testing.assert_close(bent, run(kandinsky, texts[:1]), rtol=1e-4, atol=1e-5)
    monkeypatch.undo()
    assert (bent - run(kandinsky, texts[:1])).abs().max() > 1e-3


def test_the_negative_call_strength_zero_and_outside_the_window_are_bit_identical(kandinsky):
    kind, model, pipe, inputs, texts = kandinsky
    assert torch.equal(run(kandinsky, texts[1:], dynamic={"bending": [ENTRY]}), run(kandinsky, texts[1:]))
    plain = run(kandinsky, texts[:1], step=1)
    assert torch.equal(run(kandinsky, texts[:1], 1, {"bending": [{**ENTRY, "strength": 0.0}]}), plain)
    assert torch.equal(run(kandinsky, texts[:1], 1, {"bending": [{**ENTRY, "apply_to_timesteps": [0, 0]}]}), plain)
    assert not torch.equal(run(kandinsky, texts[:1], 1, {"bending": [{**ENTRY, "apply_to_timesteps": [1, 1]}]}),
                           plain)


def test_maps_are_recorded_in_grid_order_and_phase_one_leaves_the_output(kandinsky):
    kind, model, pipe, inputs, texts = kandinsky
    session = dh.apply(pipe, {"bending": [ENTRY]}, phase=1)
    session.token_indices, session.prompt_embeds = COLUMNS, texts[:1]
    try:
        out = model(**inputs, encoder_hidden_states=texts[:1], timestep=pipe.scheduler.timesteps[:1]).sample
        maps = list(session.maps)
    finally:
        dh.remove(pipe)
    assert torch.equal(out, run(kandinsky, texts[:1]))
    assert [m["layer"] for m in maps] == [0, 1] and maps[0]["original"].shape == GRIDS[kind]


def test_the_words_columns_follow_the_pipelines_template_less_its_first_128_tokens(kandinsky):
    """The test tokenizer spells the template byte by byte (~700 tokens): a limit that keeps the prompt."""
    kind, model, pipe, inputs, texts = kandinsky
    if kind == "fractal":
        pytest.skip("the columns do not depend on the attention type")
    session = dh.apply(pipe, {"bending": [{**ENTRY, "token": "kiss"}]})
    try:
        found = prompts._locate(session, {"prompt": "a  romantic kiss at the lake",
                                          "max_sequence_length": 1000})
    finally:
        dh.remove(pipe)
    ids = pipe.tokenizer(pipe.prompt_template.format("a romantic kiss at the lake"))["input_ids"]
    kiss = pipe.tokenizer(" kiss", add_special_tokens=False)["input_ids"]
    assert len(kiss) == 1 and found == {"kiss": [ids.index(kiss[0]) - pipe.prompt_template_encode_start_idx]}
