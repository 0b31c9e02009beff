"""The shardguard node daemon, in layers (docs/architecture.md): base, coding, storage, transport, roles, service."""

import shardguard.proto  # noqa: F401, I001 - first: gRPC's fork default (proto/__init__.py)
