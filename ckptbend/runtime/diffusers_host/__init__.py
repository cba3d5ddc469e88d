"""diffusers host: wire SAG, Slothful Attention and Attention Bending into a pipeline at sampling time.

Imports only the standard library, torch and the runtime package (a ComfyUI host imports the companion
without diffusers). diffusers' objects are duck-typed: attention processors are callables
`(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs)`,
attention modules are found by `named_modules()`. The maths lives in sag.py, slothful.py and
bending.py; these modules only wire it in:

  session.py    apply / remove, the Session: hooks on the model, each call's description, batch layout
  calls.py      one model call: step index, ᾱ, token grid, batch rows (from the scheduler and the input)
  processor.py  the attention sites and the processor that stands in for each one's
  recompute.py  diffusers' AttnProcessor2_0 reproduced with two seams (reduced key/values, bent attention)
  unet.py       SAG and Slothful Attention on UNets
  cross.py      Bending at text cross-attentions (UNets, Wan 2.x and VACE's main blocks, PixArt, LTX-2's video)
  sana.py, ltx_video.py, skyreels.py   Sana's word columns and Sprint's step; the LTX-Video / SkyReels V2 calls refused
  joint.py      Bending at joint attentions over [text; image] tokens (Flux.1/.2, Chroma, SD3.x, Qwen-Image, AuraFlow)
  single.py     Bending at single-stream NextDiT attentions (Z-Image, Lumina 2)
  qwen21.py     Bending at Qwen-Image 2.x's block-causal attentions (the target image's queries)
  ernie.py      Bending at ERNIE-Image's single-stream [image; text] attentions
  krea2.py      Bending at Krea 2's single-stream [text; image] attentions (gated output, grouped k/v heads)
  hunyuan15.py  Bending at HunyuanVideo 1.5's [video; context] attentions (a text offset per item)
  hidream.py    Bending at HiDream's [image; T5, Llama, Llama] attentions (double- and single-stream blocks)
  kandinsky5.py Bending at Kandinsky 5's visual→text cross-attentions (grid or fractal 8×8-block query order)
  mochi.py      Bending at Mochi's per-item [video; valid T5 tokens] joint attentions
  ideogram4.py  Bending at Ideogram 4's packed [padding; text; image] attentions (a text offset per item)
  flux3.py      Bending at Flux.3's joint single blocks over [text; image; references] (its modular pipeline)
  motif_video.py Bending at Motif-Video's joint [video; context] attentions and text cross-attentions
  minimax_h3.py Bending at MiniMax H3's packed self-attentions; the modular pipeline's prompt (its blocks wrapped)
  modular.py    a modular pipeline's blocks wrapped: the prompt unmarked and its words found (MiniMax H3, Animate 2)
  prompts.py    the prompt's "{word}" marks and the words' token columns, per pipeline's tokenizer(s)

    session = apply(pipe, {"sag": {...}, "slothful": {...}, "bending": [...]})
    latents = pipe(prompt="a romantic {kiss} at {sunset}", ...)
    session.maps      # recorded cross-attention maps (phase 1, or record_maps=True)
    remove(pipe)      # the pipeline exactly as it was

Wiring. Every attn1 / attn2 of the model's transformer blocks gets a processor that holds the
original processor object and calls it whenever it has nothing to do (output bit-identical). A
forward pre-hook on the model (pipe.unet or pipe.transformer; Wan 2.2 A14B's low-noise expert
pipe.transformer_2 is wired alike) describes each call: latent size, batch layout, scheduler step
and ᾱ. SAG adds a pre-hook on the UNet's mid_block (its real grid) and a forward hook on the UNet
(the correction). Bending wraps pipe.encode_prompt (an instance
attribute) to strip the prompt's "{word}" marks (bending.py; nothing else of the prompt is touched,
so compel-style weights stay the user's encoder's business) and find the words' token columns.

Conventions:
- Batch layout: diffusers' CFG batches are [uncond…, cond…]: a call whose batch is twice the last
  encoded prompt's (or, before any prompt, an even batch while pipe.do_classifier_free_guidance).
  WanPipeline runs CFG as two calls of the prompt's batch: a call is conditional when its
  encoder_hidden_states equal the encoded prompt's. Without CFG, SAG is skipped (one warning) and
  bending acts on every item.
- Step index (bending's apply_to_timesteps, map records): the denoising step, 0 … num_inference_steps − 1,
  that this model call belongs to (calls.step_of), whatever the scheduler: every evaluation that goes
  into step i gets i. The call's position in scheduler.timesteps comes from the scheduler's own
  step_index (PNDM: its call counter), else the first matching timestep. Heun (order 2, timesteps
  [t0, t1, t1, t2, t2, …]) calls the model twice per step; PNDM's PLMS twice for its first step
  ([t0, t1, t1, t2, …]: the second call at t1 redoes step 0) and its Runge-Kutta warm-up four times per
  step; DDIM, Euler and multistep schedulers (DPM++ 2M, UniPC, LMS) once. A window [0, 2] thus bends the
  same three steps with any scheduler.
  Wan 2.2 A14B's two experts share the pipeline's scheduler, so a step keeps its index whichever
  expert runs it (an apply_to_timesteps window counts the whole run); layers count within an expert.
- ᾱ of a call: from the scheduler's own sigma for it when the scheduler keeps one (Euler, DPM++,
  Heun: ᾱ = 1/(1+σ²), the value the scheduler itself turns the prediction into x0 with, Karras
  sigmas included), else scheduler.alphas_cumprod[t] (DDIM, DDPM). The UNet's input is variance-
  preserving in diffusers (scale_model_input makes it so). Slothful's sigma = sqrt((1−ᾱ)/ᾱ).
- SAG's extra UNet call runs with the uncond halves of every batched argument. SAG itself (no
  recording, no recursion) and bending (no conditional item) stay out of it; Slothful stays on,
  as in ComfyUI, whose extra call runs the patched model. SAG's map is the unreduced attention
  even where Slothful reduces that site (keep_middle false).
- Maps: a record is {"token", "layer", "step", "original", "bent"}; original/bent are float32 CPU
  maps [h, w] (video [frames, h, w]): the word's columns averaged over its sub-tokens, the heads and
  the conditional items. step is None for a model call outside the scheduler's timesteps.
- Prompt lists: each prompt is searched; the words must sit at the same columns in all of them
  (else ValueError). Words are located with pipe.tokenizer (SDXL's two CLIP tokenizers agree);
  marks are also removed from prompt_2, but the columns come from prompt.
- Recomputed attention (Slothful's reduced case, Bending) follows diffusers' AttnProcessor2_0 (and
  WanAttnProcessor) for a transformer block's attention: 3-D input, no spatial / group norm, softmax
  scale d^−½; image key/values only for Wan I2V's text cross-attention (its image attention is left
  as the processor computes it). Other attentions are left to their processor. Slothful leaves calls
  with an attention mask alone.
- Bending never forms the [S, T] probabilities: the host's own attention output (recompute.host_attention:
  the diffusers backend the user chose) plus bent_attention.bent_output's exact float32 correction of the
  bent columns, per chunk of queries, on the conditional rows (recompute.bent_sdpa); the maps come from
  those columns.
"""

from __future__ import annotations

from .recompute import attention, bent_sdpa  # noqa: F401
from .session import SESSION_ATTR, Session, apply, remove  # noqa: F401
