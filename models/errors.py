"""Typed errors a person can act on: what went wrong, where (node, input, file) and the fix."""

from __future__ import annotations

import logging

log = logging.getLogger("distilled_unets")


class PackError(ValueError):
    """Base of every error this pack raises on bad input.

    ``problem`` says what is wrong, ``fix`` what to do. Nodes fill in ``node`` and ``input_name``
    (see ``nodes.host.unet.node_errors``) so the message ComfyUI shows names them.
    """

    def __init__(self, problem: str, fix: str, *, path: str | None = None, node: str | None = None,
                 input_name: str | None = None):
        self.problem = problem
        self.fix = fix
        self.path = path
        self.node = node
        self.input_name = input_name
        super().__init__(problem)

    def __reduce__(self):  # picklable whatever a subclass's __init__ takes (sent between ranks)
        return (_rebuild, (type(self), self.problem, dict(self.__dict__)))

    def __str__(self) -> str:
        where = []
        if self.node:
            where.append(self.node)
        if self.input_name:
            where.append(f"input '{self.input_name}'")
        head = f"[{', '.join(where)}] " if where else ""
        file = f" (file: {self.path})" if self.path else ""
        return f"{head}{self.problem}{file}. Fix: {self.fix}"


def _rebuild(cls, problem: str, state: dict) -> PackError:
    err = cls.__new__(cls)
    Exception.__init__(err, problem)
    err.__dict__.update(state)
    return err


class WeightFileError(PackError):
    """The file cannot be read: truncated, corrupt, or a format we refuse (pickle)."""


class NotAUNetError(PackError):
    """The tensors are readable but are not a Stable Diffusion UNet (a VAE, a text encoder, ...)."""


class IncompleteModelError(PackError):
    """A diffusers folder or sharded file is missing parts (empty or half-downloaded)."""


class IncompatibleModelsError(PackError):
    """Two models that must work together do not (latent space, conditioning, prediction type)."""


class LoraError(PackError):
    """A LoRA that cannot be applied to the given model."""
