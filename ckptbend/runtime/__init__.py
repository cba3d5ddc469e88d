"""The companion's runtime: sampling-time techniques that cannot be baked into weights, and the hosts they run in.

A companion folder carries this package whole, as it is (companion.py copies it). It imports only torch, the
standard library and itself, by relative imports, so a companion never reaches for an installed ckptbend, and
ComfyUI's own modules only inside the functions ComfyUI calls while sampling. Its rooms, by what changes together:

  defaults.py       the techniques' defaults and ranges, as data (no torch: the recipe schema reads them)
  sag.py            Self-Attention Guidance, pure torch
  slothful.py       Slothful Attention, pure torch
  bending.py        Attention Bending: an entry, the nine map transforms, bending explicit probabilities
  bent_attention.py a host's attention output plus the bent columns' exact correction (no [Lq, Lk] matrix)
  tokens.py         a word's token columns in a prompt (marks, wildcards, groups), whatever the tokenizer
  maps.py           recorded bending maps in a .safetensors file
  comfy_host/       the ComfyUI node: node.py, common.py, unet.py (SAG, Slothful, UNet bending), dit.py and
                    dit_layouts.py (DiT bending), tokens.py (ComfyUI's tokenizers and encoders), counted.py
                    (HiDream, Cosmos: blocks by call order), hidream.py (HiDream's T5 and Llama keys),
                    hunyuan_video.py (HunyuanVideo 1.0's Llama tokens)
                    nextdit.py (0.3.64's Lumina 2: main layers by call order)
  diffusers_host/   apply(pipe) / remove(pipe): session.py, calls.py, processor.py, recompute.py, unet.py,
                    cross.py (UNets, Wan, PixArt, LTX-2's video),
                    joint.py (Flux.1/.2, Chroma, SD3, Qwen-Image, AuraFlow),
                    single.py (Z-Image, Lumina 2), qwen21.py (Qwen-Image 2.x), hunyuan15.py (HunyuanVideo 1.5),
                    hidream.py (HiDream), kandinsky5.py (Kandinsky 5), mochi.py (Mochi),
                    motif_video.py (Motif-Video), minimax_h3.py (MiniMax H3),
                    hunyuan10.py (HunyuanVideo 1.0), cosmos.py (Cosmos Predict2's steps), anima.py (Anima),
                    wan_animate2.py (Wan Animate 2), modular.py (modular pipelines' prompts),
                    prompts.py
"""
