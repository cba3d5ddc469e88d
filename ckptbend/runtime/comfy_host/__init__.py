"""ComfyUI host: one custom node per recipe that patches a MODEL with the recipe's sampling-time part.

Imports only the standard library, torch and the runtime package. ComfyUI's own modules (comfy.samplers,
comfy.ldm.modules.attention) are imported by name inside the functions that run during sampling, so the
companion imports outside ComfyUI. The maths lives in sag.py, slothful.py and bending.py; these modules
only wire it into ComfyUI's model-patch hooks:

  node.py    the node class and its inputs (from the recipe), patch_model(s): which techniques go where
  common.py  ComfyUI's own attention, batch chunks, the step index
  unet.py    SAG, Slothful and Bending on UNets (attn1 / attn2 patches and replaces, a post-CFG function)
  dit.py     Bending on DiTs (optimized_attention_override, dit block replaces, an APPLY_MODEL wrapper)
  dit_layouts.py  per DiT family: where its text attention is, which call, its token layout (Wan, Flux.1/.2,
                  Chroma, SD3, Qwen-Image and 2.x, Z-Image / Lumina 2, HunyuanVideo 1.5, Krea 2, Ideogram 4)
  tokens.py  a word's text-token columns as ComfyUI's tokenizers and encoders produce them
  hunyuan_video.py  HunyuanVideo 1.0's: the Llama 3 tokens its encoder keeps from its template
  nextdit.py  NextDiT where ComfyUI writes no block_index (0.3.64's Lumina 2): main layers told by call order


  SAG       attn1_replace at ("middle", 0, 0) keeps the unconditional chunk's attention
            probabilities (its output is plain attention); a post-CFG function (cfg1 optimisation disabled)
            runs the extra unconditional model call through comfy.samplers.calc_cond_batch and
            returns sag.sag_step's result (x0 space).
  Slothful  attn1_patch reduces the key/value inputs (slothful.slothful_kv) before projection.
  Bending   UNets: attn2_replace at every cross-attention site that an entry may act on: ComfyUI's own
            attention, plus for the conditional chunks where an entry acts the correction of the
            bent columns (bent_attention.bent_output, float32).
Every hooked site computes its unchanged output with ComfyUI's own attention function, the backend
the user selected (host_attention), so wherever nothing is bent the result is bit-identical.

Node API, used by the companion's __init__.py:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = node_class_mappings(dynamic, name, sha256)
and, for scripts and tests, patch_model(model, dynamic, **inputs) -> patched clone.
"""

from __future__ import annotations

from .common import host_attention, step_index  # noqa: F401
from .dit_layouts import dit_layout  # noqa: F401
from .node import input_specs, node_class_mappings, node_id, patch_model, patch_models  # noqa: F401
from .tokens import token_columns  # noqa: F401
from .unet import cross_attention_sites  # noqa: F401
