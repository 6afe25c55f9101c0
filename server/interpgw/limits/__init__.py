"""Per-key quotas and engine admission: the limits that keep one client, or a crowd, from exhausting the gateway.

Pure Python and asyncio (no gRPC, no vLLM); every refusal is a `ResourceExhausted` with `retry_after_s`.
"""

from interpgw.limits.admission import AdmissionGate
from interpgw.limits.quota import Quota, QuotaBook, Ticket
from interpgw.limits.rate import TokenBucket
from interpgw.limits.window import SlidingWindowBudget

__all__ = ["AdmissionGate", "Quota", "QuotaBook", "SlidingWindowBudget", "Ticket", "TokenBucket"]
