"""SVD (UNetSpatioTemporalConditionModel, StableVideoDiffusionPipeline): refused at apply() in one line per technique.

Its cross-attentions attend to the CLIP image embedding (one token, no prompt), so no word has columns there. SAG's
correction would degrade the model input, which joins the noisy latents with the image latents (8 channels against a
4-channel prediction), and Slothful's reduction would take the temporal blocks' self-attention, over frames, for the
image grid: both fail on it, so they are refused before the run rather than failing in it."""

from __future__ import annotations

SVD_MODELS = ("UNetSpatioTemporalConditionModel",)
BENDING = ("Attention Bending does not reach SVD (UNetSpatioTemporalConditionModel): SVD's cross-attention attends "
           "to the CLIP image embedding, not to a prompt")
SAG_SLOTHFUL = ("SAG and Slothful Attention do not support SVD (UNetSpatioTemporalConditionModel): its input joins the "
                "noisy latents with the image latents, and its temporal blocks' self-attention runs over frames, not "
                "the image grid")


def check(models, sag_params, slothful_params, entries) -> None:
    """Raise the one-line refusal when the recipe would act on an SVD UNet."""
    if type(models[0]).__name__ not in SVD_MODELS:
        return
    if entries:
        raise ValueError(BENDING)
    if sag_params or slothful_params:
        raise ValueError(SAG_SLOTHFUL)
