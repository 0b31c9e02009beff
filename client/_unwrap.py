"""The torch optimizer inside the wrappers frameworks put around it (imports torch only)."""

from __future__ import annotations

from typing import Any

import torch

# Attributes under which wrappers keep the optimizer they wrap: accelerate's
# AcceleratedOptimizer and transformers' wrappers (``optimizer``), Lightning's
# LightningOptimizer (``_optimizer``).
_INNER = ("optimizer", "_optimizer")


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` that actually steps.

    accelerate's ``AcceleratedOptimizer`` subclasses ``torch.optim.Optimizer`` without
    calling its ``__init__``, so it has no hook registry of its own
    (``register_step_pre_hook`` fails on it); its ``step()`` calls the inner optimizer's,
    whose hooks fire. A plain optimizer is returned as it is.

    Raises:
        TypeError: nothing inside is a torch optimizer.
    """
    seen: set[int] = set()
    current = optimizer
    while id(current) not in seen:
        seen.add(id(current))
        # A real optimizer has run Optimizer.__init__: its hook registry is in its __dict__.
        if isinstance(current, torch.optim.Optimizer) and \
                "_optimizer_step_pre_hooks" in vars(current):
            return current
        inner = next((getattr(current, a) for a in _INNER
                      if getattr(current, a, None) is not None), None)
        if inner is None:
            break
        current = inner
    raise TypeError(f"{type(optimizer).__qualname__} is not a torch optimizer and wraps none "
                    f"(looked under {', '.join(_INNER)})")
