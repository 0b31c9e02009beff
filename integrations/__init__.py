"""Framework integrations: one line to protect a Hugging Face Trainer, a Lightning fit, a
torchtitan run with shardguard.

Each framework lives in its own module and is imported only when that module is::

    from shardguard.integrations.hf import ShardguardCallback               # transformers
    from shardguard.integrations.lightning import ShardguardLightningCallback
    from shardguard.integrations.torchtitan import ShardguardCheckpointManager

This package itself imports no framework (nor does the daemon import it). The versions
each module accepts are in :data:`SUPPORTED`; another version is refused at import with
:class:`UnsupportedVersionError`, which names the supported range.
"""

from shardguard.client._unwrap import unwrap_optimizer
from shardguard.integrations._versions import SUPPORTED, UnsupportedVersionError, require

__all__ = ["SUPPORTED", "UnsupportedVersionError", "require", "unwrap_optimizer"]
