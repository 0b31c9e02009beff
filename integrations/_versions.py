"""Which framework versions each integration accepts, checked when it is imported."""

from __future__ import annotations

import importlib.metadata

from shardguard.client.errors import ShardguardError

#: Distribution -> the versions the integration is written and tested for (the extras in
#: pyproject.toml pin the same ranges; the suite runs the versions named in README).
SUPPORTED: dict[str, str] = {
    "transformers": ">=5.0,<6",
    "accelerate": ">=1.0,<2",
    "lightning": ">=2.4,<3",
    "torchtitan": ">=0.3,<0.4",
}

#: Which extra installs each distribution.
_EXTRA = {"transformers": "hf", "accelerate": "hf", "lightning": "lightning",
          "torchtitan": "torchtitan"}


class UnsupportedVersionError(ShardguardError, ImportError):
    """A framework is missing, or installed at a version the integration does not support."""


def require(dist: str, installed: str | None = None) -> str:
    """The installed version of ``dist``, if :data:`SUPPORTED` accepts it.

    Args:
        dist: a distribution named in :data:`SUPPORTED`.
        installed: the version to check instead of the installed one (tests).

    Raises:
        UnsupportedVersionError: ``dist`` is not installed, or its version is outside the
            supported range (the message names the range and the extra that installs it).
    """
    wanted = SUPPORTED[dist]
    hint = f"pip install 'shardguard[{_EXTRA[dist]}]' (or '{dist}{wanted}')"
    if installed is None:
        try:
            installed = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            raise UnsupportedVersionError(
                f"shardguard's {_EXTRA[dist]} integration needs {dist}{wanted}, which is not "
                f"installed: {hint}") from None
    from packaging.specifiers import SpecifierSet  # every framework depends on packaging
    from packaging.version import Version

    # Pre-releases and local builds (2.6.0rc1, 5.25.0+cu) count as the release they lead to.
    if not SpecifierSet(wanted).contains(Version(installed), prereleases=True):
        raise UnsupportedVersionError(
            f"shardguard's {_EXTRA[dist]} integration supports {dist}{wanted}; "
            f"{dist} {installed} is installed: {hint}")
    return installed
