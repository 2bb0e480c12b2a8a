"""splitserve routing: which version serves a request (labels, weighted splits, sticky
keys, shadow copies). A pure library: stdlib and YAML only, never the runtime, torch or
a web framework.
"""

from router.assign import stable_unit
from router.config import RouteConfig, ShadowConfig, StickyConfig, validate_against
from router.configfile import load_config_file, parse_config_text, persist_config_file
from router.errors import RoutingError
from router.router import Router
from router.table import RouteDecision, RoutingTable

__all__ = [
    "RouteConfig",
    "RouteDecision",
    "Router",
    "RoutingError",
    "RoutingTable",
    "ShadowConfig",
    "StickyConfig",
    "load_config_file",
    "parse_config_text",
    "persist_config_file",
    "stable_unit",
    "validate_against",
]
