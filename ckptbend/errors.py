"""The one exception type ckptbend raises for anything a user can fix."""


class CkptbendError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def broken_install_message(exc: BaseException) -> str | None:
    """One line for an install that cannot import diffusers/transformers (their lazy imports wrap the cause in
    three chained exceptions), or None when `exc` is something else: that stays a bug with its traceback."""
    chain = [exc]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 32:
        chain.append(nxt)
    if not any("Failed to import" in str(e) or "Could not import module" in str(e) for e in chain):
        return None
    root = chain[-1]
    if "torchvision::" in str(root):
        # The classic mismatch: transformers imports torchvision whenever it is installed, and a torchvision
        # built for another torch fails to register its operators.
        from importlib.metadata import version

        import torch

        return (f"the installed torchvision {version('torchvision')} was not built for torch {torch.__version__} "
                f"({root}); transformers imports it whenever it is installed: install the torchvision made for "
                "this torch, or `pip uninstall torchvision` (ckptbend does not need it)")
    return (f"diffusers/transformers could not import their own modules ({type(root).__name__}: {root}); "
            "check that torch, transformers and diffusers are installed for this Python")
