"""fqdnguard: a DNS-name egress firewall for containers.

Cilium-compatible ``toFQDNs`` / ``rules.dns`` semantics with a Rust core. The compiled module
``fqdnguard._core`` is private; this package is the public face.
"""

from fqdnguard._core import (
    Edns,
    FqdnGuardError,
    Message,
    PatternError,
    PatternSet,
    Question,
    Record,
    WireError,
    __version__,
    make_error_response,
    parse_message,
    resolve_answer,
    validate_name,
    validate_pattern,
)

__all__ = [
    "Edns",
    "FqdnGuardError",
    "Message",
    "PatternError",
    "PatternSet",
    "Question",
    "Record",
    "WireError",
    "__version__",
    "make_error_response",
    "parse_message",
    "resolve_answer",
    "validate_name",
    "validate_pattern",
]
