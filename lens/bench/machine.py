"""What machine a benchmark ran on: CPU model, vector ISA, cores, threads, load - printed by every run.

Sparse and dense attention kernels depend on the CPU far more than on anything else (FlexAttention ran
at 0.68 of SDPA's speed on one CPU and at 0.30-0.40 on a 2-core AVX-512/AMX Xeon), so a figure without
its machine cannot be compared with another.
"""

from __future__ import annotations

import os
import platform

__all__ = ["machine_info", "machine_line", "ratio_interval"]


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and value.strip():
                    model = value.strip()
                elif key in ("flags", "Features"):  # x86, ARM
                    flags = set(value.split())
                elif not key and flags:
                    break  # the first processor's block is enough
    except OSError:
        pass
    return model, flags


def machine_info() -> dict:
    """CPU model, ISA extensions (AVX2 / AVX-512 / AMX), cores, torch threads, torch's own CPU capability,
    memory and the load average: a JSON-able dict.

    Example: ``machine_info()["isa"]`` → ``['AVX2', 'AVX-512', 'AVX-512 BF16', 'AMX']``.
    """
    import torch

    model, flags = _cpuinfo()
    isa = []
    for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AVX-512 BF16", "avx512_bf16"),
                       ("AVX-512 FP16", "avx512_fp16"), ("AMX", "amx_tile"), ("NEON", "asimd")):
        if flag in flags:
            isa.append(name)
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch
        capability = None
    memory_gb = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    memory_gb = round(int(line.split()[1]) / 1e6, 1)
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "cpu": model,
        "isa": isa,
        "torch_cpu_capability": capability,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "memory_gb": memory_gb,
        "torch": torch.__version__,
        "load_average": load,
    }


def machine_line(info: dict | None = None) -> str:
    """One line for the top of a benchmark table.

    Example: ``machine: Intel(R) Xeon(R) Processor · AVX2, AVX-512, AMX · 2 cores, 2 threads · torch 2.13.0``.
    """
    info = info or machine_info()
    isa = ", ".join(info["isa"]) or "no AVX2"
    extra = f" (torch dispatches {info['torch_cpu_capability']})" if info.get("torch_cpu_capability") else ""
    load = f" · load average {info['load_average']:.1f}" if info.get("load_average") is not None else ""
    return (f"machine: {info['cpu']} · {isa}{extra} · {info['cores']} cores, {info['threads']} threads, "
            f"{info['memory_gb']} GB · torch {info['torch']}{load}")


# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal 1.96)
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def ratio_interval(ratios) -> tuple[float, float, float]:
    """(geometric mean, low, high) of paired time ratios with a 95% Student-t interval on their logs.

    Each ratio is one interleaved pair (method / baseline measured back to back), so machine load that
    drifts between pairs cancels within each. With one ratio the interval is unbounded.

    Example: ``ratio_interval([1.05, 1.07, 1.06])`` → ``(1.0600, 1.035…, 1.085…)``.
    """
    import math
    import statistics

    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), 0.0, math.inf
    half = _T95[min(len(logs) - 2, len(_T95) - 1)] * statistics.stdev(logs) / math.sqrt(len(logs))
    if len(logs) - 1 > len(_T95):
        half = 1.96 * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)
