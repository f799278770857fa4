"""Settings from the environment (settings.py), with the parsed types of the settings that are more than a
scalar: guest forwards (forwards.py) and the login pool's sizes (login_pool.py).

A leaf of the package: it imports nothing from polydev, so every layer (core, vm, store, api, cli) may read
its settings from here.
"""

from polydev.config.forwards import GuestForward, parse_guest_forwards
from polydev.config.login_pool import LoginPoolSizes, parse_login_pool
from polydev.config.settings import PROVIDERS, Settings, get_settings, normalize_database_url, redact_url

__all__ = ["PROVIDERS", "GuestForward", "LoginPoolSizes", "Settings", "get_settings", "normalize_database_url",
           "parse_guest_forwards", "parse_login_pool", "redact_url"]
