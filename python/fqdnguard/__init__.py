"""fqdnguard: a DNS-name egress firewall for containers.

Cilium-compatible ``toFQDNs`` / ``rules.dns`` semantics with a Rust core. The compiled module
``fqdnguard._core`` is private; this package is the public face.
"""

from fqdnguard._core import (
    CompiledPolicy,
    FqdnGuardError,
    PatternError,
    PatternSet,
    Verdict,
    __version__,
    validate_name,
    validate_pattern,
)
from fqdnguard.endpoints import Endpoint, Endpoints, Selector
from fqdnguard.policy import Policy, PolicyError, PolicyWarning

__all__ = [
    "CompiledPolicy",
    "Endpoint",
    "Endpoints",
    "FqdnGuardError",
    "PatternError",
    "PatternSet",
    "Policy",
    "PolicyError",
    "PolicyWarning",
    "Selector",
    "Verdict",
    "__version__",
    "validate_name",
    "validate_pattern",
]
