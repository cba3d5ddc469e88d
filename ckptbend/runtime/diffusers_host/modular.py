"""diffusers' modular pipelines (ModularPipeline.__call__ runs pipe._blocks(pipe, state)) have no encode_prompt to
wrap: their blocks are wrapped instead, so that with bending the state's prompt is stripped of its marks and its
words found before any block runs (MiniMax H3, Wan Animate 2), or only stripped, where a later step finds them in
what a prompt upsampler wrote (Flux.3: the upsampler never sees the marks)."""

from __future__ import annotations

from .prompts import unmark


class PromptBlocks:
    """Stands in for pipe._blocks; `find(session, prompt)` gives the unmarked prompt's word columns (None: the
    prompt, one or a list, only unmarked)."""

    def __init__(self, session, inner, family, find):
        self.session, self.inner, self.family, self.find = session, inner, family, find

    def __getattr__(self, name):             # only for what the instance lacks (deepcopy probes before __init__)
        if name.startswith("__") or name in ("session", "inner", "family", "find"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, pipeline, state):
        session = self.session
        if session.entries and self.find is None:
            if state.get("prompt") is not None:
                state.set("prompt", unmark(state.get("prompt")))
        elif session.entries:
            prompt = state.get("prompt")
            if not isinstance(prompt, str):
                raise ValueError(f"Attention Bending finds its words in the prompt: call the {self.family} pipeline "
                                 "with prompt=... (one string)")
            state.set("prompt", unmark(prompt))
            session.token_indices = self.find(session, state.get("prompt"))
        return self.inner(pipeline, state)


def wrap_blocks(session, family: str, find) -> None:
    """pipe._blocks wrapped; undone by remove(). A pipeline without _blocks is left as it is."""
    pipe = session.pipe
    inner = getattr(pipe, "_blocks", None)
    if inner is None:
        return
    pipe._blocks = PromptBlocks(session, inner, family, find)
    session._undo.append(lambda: setattr(pipe, "_blocks", inner))
