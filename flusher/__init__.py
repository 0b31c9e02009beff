"""The persistent tier's flusher: the process the daemon starts per flush to write the ranks
it staged as DCP checkpoints (``python -m shardguard.flusher``, see ``__main__``).

It is its own package because the daemon never imports torch and the flusher needs it:
it imports only ``shardguard.proto`` and torch, and the daemon names it only as a module
to run. Importing this package imports nothing (the process sets up its watchdog before
torch loads).
"""
