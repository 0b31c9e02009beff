"""The contracts shared by the client and the daemon.

``agent.proto`` is the client↔daemon gRPC service (package ``shardguard.v1``);
its generated modules (``agent_pb2``, ``agent_pb2_grpc``) are produced at build
time. ``arena`` is the /dev/shm arena format, ``manifest`` the plain-data
manifest codec, ``errors`` the typed errors that travel over the wire.
"""
