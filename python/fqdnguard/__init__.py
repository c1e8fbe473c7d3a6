"""fqdnguard: a DNS-name egress firewall for containers.

Cilium-compatible ``toFQDNs`` / ``rules.dns`` semantics with a Rust core. The compiled module
``fqdnguard._core`` is private; this package is the public face.
"""

from fqdnguard._core import (
    CacheError,
    Change,
    DnsCache,
    FqdnGuardError,
    PatternError,
    PatternSet,
    __version__,
    validate_name,
    validate_pattern,
)

__all__ = [
    "CacheError",
    "Change",
    "DnsCache",
    "FqdnGuardError",
    "PatternError",
    "PatternSet",
    "__version__",
    "validate_name",
    "validate_pattern",
]
