"""``python -m shardguard.daemon`` runs the node daemon (same as ``shardguard daemon``)."""

import sys

from shardguard.daemon.service.cli import main

sys.exit(main(["daemon", *sys.argv[1:]]))
