"""fqdnguard: a DNS-name egress firewall for containers.

Cilium-compatible ``toFQDNs`` / ``rules.dns`` semantics with a Rust core. The compiled module
``fqdnguard._core`` is private; this package is the public face.
"""

from fqdnguard import backends as backends
from fqdnguard._core import (
    CacheError,
    Change,
    ChangeList,
    CompiledPolicy,
    DnsCache,
    Edns,
    FqdnGuardError,
    Message,
    PatternError,
    PatternSet,
    Question,
    Record,
    Verdict,
    WireError,
    __version__,
    make_error_response,
    parse_message,
    resolve_answer,
    validate_name,
    validate_pattern,
)
from fqdnguard.endpoints import Endpoint, Endpoints, Selector
from fqdnguard.policy import Policy, PolicyError, PolicyWarning
from fqdnguard.proxy import Proxy

__all__ = [
    "CacheError",
    "Change",
    "ChangeList",
    "CompiledPolicy",
    "DnsCache",
    "Edns",
    "Endpoint",
    "Endpoints",
    "FqdnGuardError",
    "Message",
    "PatternError",
    "PatternSet",
    "Policy",
    "PolicyError",
    "PolicyWarning",
    "Proxy",
    "Question",
    "Record",
    "Selector",
    "Verdict",
    "WireError",
    "__version__",
    "make_error_response",
    "parse_message",
    "resolve_answer",
    "validate_name",
    "validate_pattern",
]
