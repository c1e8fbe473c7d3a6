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
from fqdnguard._core import CompiledPolicy, Verdict
from fqdnguard.endpoints import Endpoint, Endpoints, Selector
from fqdnguard.policy import Policy, PolicyError, PolicyWarning

__all__ = [
    "FqdnGuardError",
    "PatternError",
    "PatternSet",
    "__version__",
    "validate_name",
    "validate_pattern",
    "CompiledPolicy",
    "Endpoint",
    "Endpoints",
    "Policy",
    "PolicyError",
    "PolicyWarning",
    "Selector",
    "Verdict",
]
