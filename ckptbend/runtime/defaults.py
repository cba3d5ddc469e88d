"""The techniques' parameters as data: defaults and the original nodes' ranges (standard library only).

The one place these numbers live: the runtime (sag.py, slothful.py, bending.py, the ComfyUI node's inputs)
reads them here, and so does ckptbend's recipe schema, which imports this module without torch. A companion
carries it inside its copy of the runtime package.
"""

# Self-Attention Guidance: ComfyUI's SelfAttentionGuidance node.
SAG_DEFAULTS = {"scale": 0.5, "blur_sigma": 2.0}
SAG_RANGES = {"scale": (-2.0, 5.0), "blur_sigma": (0.0, 10.0)}

# Slothful Attention, the node's Dec 2023 version.
SLOTHFUL_MODES = ("1D_AVG", "1D_MAX", "2D_AVG", "2D_MAX")
SLOTHFUL_DEFAULTS = {
    "time_decay": 1.0, "keep_middle": True,
    "in_mode": "2D_AVG", "in_depth_decay": 1.0, "in_strength": 6.0, "in_k_blend": 0.0, "in_v_blend": 0.0,
    "out_mode": "2D_AVG", "out_depth_decay": 1.0, "out_strength": 4.0, "out_k_blend": 0.0, "out_v_blend": 0.0,
}
SLOTHFUL_RANGES = {
    "time_decay": (0.0, 4.0),
    "in_depth_decay": (-2.0, 4.0), "out_depth_decay": (-2.0, 4.0),
    "in_strength": (0.0, 50.0), "out_strength": (0.0, 50.0),
    "in_k_blend": (0.0, 1.0), "in_v_blend": (0.0, 1.0), "out_k_blend": (0.0, 1.0), "out_v_blend": (0.0, 1.0),
}
# "Slothful Attention Simple": one depth_decay, one blend per side, keep_middle fixed to true. Each of its
# names sets these full-node parameters (its defaults are the full node's: the reference documents no others).
SLOTHFUL_SIMPLE_EXPANDS = {
    "time_decay": ("time_decay",),
    "depth_decay": ("in_depth_decay", "out_depth_decay"),
    "in_mode": ("in_mode",),
    "in_strength": ("in_strength",),
    "in_blend": ("in_k_blend", "in_v_blend"),
    "out_mode": ("out_mode",),
    "out_strength": ("out_strength",),
    "out_blend": ("out_k_blend", "out_v_blend"),
}
SLOTHFUL_SIMPLE_FIXED = {"keep_middle": True}
SLOTHFUL_SIMPLE_DEFAULTS = {name: SLOTHFUL_DEFAULTS[full[0]] for name, full in SLOTHFUL_SIMPLE_EXPANDS.items()}
SLOTHFUL_SIMPLE_RANGES = {name: SLOTHFUL_RANGES[full[0]] for name, full in SLOTHFUL_SIMPLE_EXPANDS.items()
                          if full[0] in SLOTHFUL_RANGES}

# Attention Bending: an entry's fields besides token and mode, with the original's defaults.
BEND_DEFAULTS = {
    "strength": 1.0,
    "apply_to_timesteps": None,     # [start, end] scheduler step indices, both inclusive; None = all
    "apply_to_layers": None,        # text-attention site indices; None = all
    "renormalize": "row",           # "row" | "column" (the original's first version) | "none"
    "scale_factor": 1.0,            # scale
    "zoom_factor": 1.0,             # spatial_scale
    "angle": 0.0,                   # rotate, degrees
    "translate_x": 0.0,             # translate, normalised units −1..1
    "translate_y": 0.0,
    "flip_horizontal": False,       # flip
    "flip_vertical": False,
    "kernel_size": 3,               # blur, sharpen, frequency_filter (the placeholder)
    "sigma": 1.0,
    "sharpen_amount": 1.0,          # sharpen
    "region": None,                 # regional_mask: x1, y1, x2, y2 in 0–1; None leaves the map unchanged
    "region_feather": 0.1,
    "filter": None,                 # frequency_filter: "lowpass" | "highpass", else the original's placeholder
    "cutoff": 0.5,                  # fraction of Nyquist
}
BEND_RANGES = {"translate_x": (-1.0, 1.0), "translate_y": (-1.0, 1.0), "region": (0.0, 1.0), "cutoff": (0.0, 1.0)}
