"""shardguard.integrations without a daemon: the version guard, the optimizer unwrap, and
that neither the package nor the daemon imports a framework."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from shardguard.integrations import SUPPORTED, UnsupportedVersionError, require, unwrap_optimizer


def imported_after(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    return set(out.split())


def test_the_package_imports_no_framework_and_the_daemon_not_the_package() -> None:
    mods = imported_after("shardguard.integrations")
    assert not {"transformers", "accelerate", "lightning", "torchtitan"} & mods
    mods = imported_after("shardguard.daemon.service.cli")
    assert not any(m.startswith("shardguard.integrations") for m in mods)


@pytest.mark.parametrize("dist,bad", [("transformers", "4.57.6"), ("transformers", "6.0.0"),
                                      ("lightning", "2.3.3"), ("torchtitan", "0.2.2"),
                                      ("accelerate", "0.34.2")])
def test_an_unsupported_version_is_refused_naming_the_range(dist: str, bad: str) -> None:
    with pytest.raises(UnsupportedVersionError) as err:
        require(dist, bad)
    assert SUPPORTED[dist] in str(err.value) and bad in str(err.value)
    assert isinstance(err.value, ImportError)


@pytest.mark.parametrize("dist", list(SUPPORTED))
def test_the_installed_versions_are_supported(dist: str) -> None:
    require(dist)


def test_unwrap_finds_the_optimizer_inside_accelerate_and_lightning_wrappers() -> None:
    from accelerate.optimizer import AcceleratedOptimizer
    from lightning.pytorch.core.optimizer import LightningOptimizer

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert unwrap_optimizer(opt) is opt
    # Built as AcceleratedOptimizer.__init__ builds it, without the accelerator state it
    # asks for: a torch Optimizer subclass whose Optimizer.__init__ never ran.
    wrapped = AcceleratedOptimizer.__new__(AcceleratedOptimizer)
    wrapped.optimizer = opt
    with pytest.raises(AttributeError):
        wrapped.register_step_pre_hook(lambda *_: None)  # what client.protect() hit
    assert unwrap_optimizer(wrapped) is opt
    assert unwrap_optimizer(LightningOptimizer(opt)) is opt
    with pytest.raises(TypeError):
        unwrap_optimizer(object())
