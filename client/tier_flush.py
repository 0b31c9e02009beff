"""The old name of the flusher, ``shardguard.flusher``: the daemon's tier still starts
``python -m shardguard.client.tier_flush``. Remove this module once it names
``shardguard.flusher``."""

import runpy

if __name__ == "__main__":
    runpy.run_module("shardguard.flusher", run_name="__main__", alter_sys=True)
