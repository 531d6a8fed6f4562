"""What a simulated run costs: VMs by the vCPU-hour and GB-hour, functions by the GB-second
(billed per call, rounded up to the millisecond, as AWS Lambda bills) plus a price per call.

VMs are billed for the whole run (from setup to the last worker's end): the worker nodes the
run used and the store servers (or the broker). Functions are billed per call, whatever the
run's length.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["BILL_STEP_S", "bill"]

BILL_STEP_S = 0.001  # function durations are rounded up to this


def bill(prices: dict[str, float], seconds: float, vms: Iterable[tuple[float, float, int]],
         function_calls: Iterable[float] = (), function_gb: float = 0.0) -> dict[str, Any]:
    """Dollars for ``seconds`` of ``vms`` ((vcpus, memory GB, count) each) and one function
    call per duration in ``function_calls`` at ``function_gb``.

    Returns the parts: vm_vcpu_s, vm_gb_s, vm_usd, function_calls, function_gb_s,
    function_usd, usd (the total).
    """
    vcpu_s = gb_s = 0.0
    for vcpus, mem, count in vms:
        vcpu_s += vcpus * count * seconds
        gb_s += mem * count * seconds
    vm_usd = vcpu_s / 3600 * prices["vcpu_hour"] + gb_s / 3600 * prices["gb_hour"]
    calls, f_gb_s = 0, 0.0
    for d in function_calls:
        calls += 1
        billed = math.ceil(max(d, 0.0) / BILL_STEP_S - 1e-9) * BILL_STEP_S
        f_gb_s += function_gb * max(billed, BILL_STEP_S)
    f_usd = f_gb_s * prices["function_gb_second"] + calls * prices["function_request"]
    return {"vm_vcpu_s": vcpu_s, "vm_gb_s": gb_s, "vm_usd": vm_usd, "function_calls": calls,
            "function_gb_s": f_gb_s, "function_usd": f_usd, "usd": vm_usd + f_usd}
