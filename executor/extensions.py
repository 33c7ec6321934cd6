"""The model providers and tools this executor ships.

Importing a provider's or a tool's module registers it, with the domain (which then accepts
agents naming it) and with the executor (which then creates and calls it). The executor loads
them all at startup, before it validates any agent or takes any run: an agent naming something
not loaded yet would be refused. Shipping a new provider or tool is its module and its line here.
"""

from __future__ import annotations

import importlib

SHIPPED = (
    "executor.models.scripted",
    "executor.models.openai",
    "executor.tools.clock",
    "executor.tools.calculator",
    "executor.tools.send_email",
    "executor.tools.http",
    "executor.tools.client",
)


def load_extensions() -> None:
    """Registers the shipped providers and tools (again: nothing happens)."""
    for module in SHIPPED:
        importlib.import_module(module)
