"""Capture and rewrite activations of named modules with plain forward hooks.

:class:`Trace` is the one tool every stage uses to look inside a model: statistics collection
reads the inputs of ``down_proj`` (the keys), key computation reads them at the subject's last
token, value optimisation adds a trainable δ to a decoder layer's output through
``edit_output``, and evaluation applies per-row deltas. It registers ordinary
``register_forward_hook`` hooks (no monkey-patching of transformers classes), always removes
them on exit, also when the forward pass raises, and can end the forward pass as soon as the
last module it needs has run, which saves the cost of the layers above it.

Decoder layers return either a tensor (transformers ≥ 5) or a tuple whose first element is
the hidden state (older versions). Trace hides the difference: ``outputs[name]`` and the
``output`` given to ``edit_output`` are always that hidden-state tensor, and a tuple is
rebuilt around the edited tensor.

Not here: deciding *what* to record (callers pass module names from ``ModelSpec``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

EditFn = Callable[[str, torch.Tensor], torch.Tensor]


class _StopForward(Exception):
    """Raised inside a hook to end the forward pass; swallowed by the Trace that raised it."""

    def __init__(self, trace: Trace):
        super().__init__("forward pass stopped by pmedit.hooks.Trace(stop=True)")
        self.trace = trace


def _primary(output: Any) -> tuple[Any, Callable[[Any], Any] | None]:
    """(hidden-state tensor, rebuild(new) -> output in the module's own form)."""
    if torch.is_tensor(output):
        return output, lambda new: new
    if isinstance(output, tuple) and output and torch.is_tensor(output[0]):
        rest = output[1:]
        return output[0], lambda new: (new, *rest)
    if isinstance(output, list) and output and torch.is_tensor(output[0]):
        rest = output[1:]
        return output[0], lambda new: [new, *rest]
    return output, None


def _first_input(args: tuple, kwargs: dict) -> Any:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    for v in kwargs.values():
        if torch.is_tensor(v):
            return v
    return None


class Trace:
    """Context manager recording (and optionally rewriting) named modules during forward passes.

    ``names``: one dotted module name or several (``model.get_submodule`` names).
    ``retain_input``: keep the first positional input of each module in ``.inputs[name]``.
    ``retain_output``: keep each module's output (the hidden state, see module doc) in
    ``.outputs[name]``. Tensors are kept as they are (not detached or cloned), so under autograd
    they stay in the graph. A module called several times in one pass keeps its last call.
    ``stop``: once every listed module has run, end the forward pass by raising a private
    exception that this context swallows on exit. Code after the model call inside the
    ``with`` block then does not run; use :meth:`run` to call the model and carry on.
    ``edit_output(name, output) -> new_output``: replaces the module's output (applied before
    it is retained, so ``.outputs`` shows what flowed on).
    """

    def __init__(
        self,
        model: nn.Module,
        names: str | Iterable[str],
        *,
        retain_input: bool = False,
        retain_output: bool = False,
        stop: bool = False,
        edit_output: EditFn | None = None,
    ):
        self.names = [names] if isinstance(names, str) else list(names)
        if not self.names:
            raise ValueError("Trace needs at least one module name")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"Trace: duplicate module names in {self.names}")
        if edit_output is not None and not callable(edit_output):
            raise TypeError(f"edit_output must be callable (name, output) -> output, got {type(edit_output).__name__}")
        self.modules: dict[str, nn.Module] = {}
        for name in self.names:
            try:
                self.modules[name] = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"Trace: {type(model).__name__} has no submodule named {name!r}") from None
        self.model = model
        self.retain_input = retain_input
        self.retain_output = retain_output
        self.stop = stop
        self.edit_output = edit_output
        self.inputs: dict[str, Any] = {}
        self.outputs: dict[str, Any] = {}
        self.stopped = False
        self._seen: set[str] = set()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # -- hooks --------------------------------------------------------------------------------

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any):
            if self.retain_input:
                self.inputs[name] = _first_input(args, kwargs)
            new_output = None
            if self.edit_output is not None:
                hidden, rebuild = _primary(output)
                edited = self.edit_output(name, hidden)
                if edited is None:
                    raise TypeError(f"edit_output returned None for module {name!r}; return the (new) output")
                if rebuild is None:  # an output form Trace does not know: the callback owns it
                    new_output = edited
                elif edited is not hidden:
                    new_output = rebuild(edited)
                else:
                    new_output = output
            shown = output if new_output is None else new_output
            if self.retain_output:
                self.outputs[name] = _primary(shown)[0]
            self._seen.add(name)
            if self.stop and len(self._seen) == len(self.names):
                self.stopped = True
                raise _StopForward(self)
            return new_output  # None keeps the module's own output

        return hook

    def __enter__(self) -> Trace:
        if self._handles:
            raise RuntimeError("this Trace is already active; create a new one to nest")
        self._seen.clear()
        self.stopped = False
        try:
            for name in self.names:
                self._handles.append(
                    self.modules[name].register_forward_hook(self._make_hook(name), with_kwargs=True)
                )
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return isinstance(exc, _StopForward) and exc.trace is self

    def close(self) -> None:
        """Remove every hook this Trace registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    # -- helpers ------------------------------------------------------------------------------

    def run(self, *args, **kwargs) -> Any:
        """Call the model; returns its output, or None when this Trace stopped the pass early.

        Must be called inside the ``with`` block. Each call clears the stop bookkeeping so one
        Trace serves many batches.
        """
        if not self._handles:
            raise RuntimeError("Trace.run must be called inside `with Trace(...) as tr:`")
        self._seen.clear()
        self.stopped = False
        try:
            return self.model(*args, **kwargs)
        except _StopForward as e:
            if e.trace is not self:
                raise
            return None


def run_until(model: nn.Module, names: str | Iterable[str], *args, retain_output: bool = True, **kwargs):
    """One forward pass that stops after the last of ``names``; returns the Trace with its records."""
    with Trace(model, names, retain_input=True, retain_output=retain_output, stop=True) as tr:
        tr.run(*args, **kwargs)
    return tr
