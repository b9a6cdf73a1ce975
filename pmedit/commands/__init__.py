"""Sub-commands of the ``pmedit`` CLI (see pmedit/cli.py for the protocol)."""
