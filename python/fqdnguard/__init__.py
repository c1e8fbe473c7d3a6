"""fqdnguard: a DNS-name egress firewall for containers.

Cilium-compatible ``toFQDNs`` / ``rules.dns`` semantics with a Rust core. The compiled module
``fqdnguard._core`` is private; this package is the public face.
"""

from fqdnguard._core import (
    FqdnGuardError,
    PatternError,
    PatternSet,
    __version__,
    validate_name,
    validate_pattern,
)
from fqdnguard._core import (
    Edns,
    Message,
    Question,
    Record,
    WireError,
    make_error_response,
    parse_message,
    resolve_answer,
)

__all__ = [
    "FqdnGuardError",
    "PatternError",
    "PatternSet",
    "__version__",
    "validate_name",
    "validate_pattern",
    "Edns",
    "Message",
    "Question",
    "Record",
    "WireError",
    "make_error_response",
    "parse_message",
    "resolve_answer",
]
