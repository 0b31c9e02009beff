"""The shardguard node daemon: arena store, codec, peers, coordinator, restore, CLI."""
