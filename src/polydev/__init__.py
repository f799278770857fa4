"""Polydev: AI coding CLIs in disposable microVMs."""

__version__ = "0.1.0"
