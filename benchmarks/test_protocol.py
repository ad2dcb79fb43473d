"""The benchmark protocol (benchmarks/protocol.py) as a pytest entry point.

    pytest benchmarks/test_protocol.py                          # full protocol, ~20 min on 2 cores
    IBKD_BENCH_QUICK=1 pytest benchmarks/test_protocol.py       # smoke run, results/quick/

No timed assertion: the run records its numbers (results/protocol-<machine>.json, or
...-noisy.json when the GEMM ceiling moved by more than 20 % during the run) and the test only
checks that every worker ran.
"""

import os

import bench_common as bc
import protocol


def test_protocol_run():
    out = protocol.results_path(bc.QUICK) + ".running"
    doc = protocol.run_protocol(bc.QUICK, os.cpu_count(), ["default", "PASSIVE"], out)
    final = protocol.results_path(bc.QUICK, noisy=doc["noisy"])
    os.replace(out, final)
    errors = [(c["key"], p, t["error"]) for c in doc["cases"] for p, t in c["timing"].items() if "error" in t]
    errors += [(c["key"], p, m["error"]) for c in doc["cases"] for p, m in c["memory"].items() if "error" in m]
    assert not errors, errors
