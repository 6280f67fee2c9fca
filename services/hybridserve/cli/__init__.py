"""The `hybridserve` command: `main` and its parser live in cli/main.py, the commands
in one module per group (client_cmds, admin, server, finetune)."""

from hybridserve.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
