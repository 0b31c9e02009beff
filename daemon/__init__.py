"""The shardguard node daemon, in layers (docs/architecture.md): base, coding, storage, transport, roles, service."""
