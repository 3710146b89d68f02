"""Whether this machine's CPU computes bf16 natively: the load-time check behind every bf16-on-CPU setting.

torch runs bf16 on any CPU, but without native bf16 instructions it converts each operand to fp32 and back, so a
"faster" setting runs slower than fp32 (and rounds like bf16). A config asking for bf16 on a CPU is therefore
refused at load on a CPU without them, naming the field; each component loads the config on its own host, so the
check is made where the model will run. The flags are read from /proc/cpuinfo (Linux), without importing torch.
"""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# x86: AVX512-BF16 (Cooper Lake, Zen 4 and later) or AMX-BF16 (Sapphire Rapids and later); Arm: the BF16 extension.
BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


def cpu_bf16_feature(cpuinfo: Path | None = None) -> str | None:
    """The native bf16 feature this CPU reports (e.g. "avx512_bf16"), or None (none, or no /proc/cpuinfo)."""
    try:
        text = (cpuinfo or CPUINFO).read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 names them flags, Arm Features
            flags.update(value.split())
    return next((f for f in BF16_FLAGS if f in flags), None)


def check_cpu_bf16(field: str, fix: str) -> None:
    """ValueError naming `field` and `fix` when the CPU has no native bf16."""
    if cpu_bf16_feature() is None:
        raise ValueError(
            f"{field} asks for bf16 on a CPU without native bf16 (no avx512_bf16, amx_bf16 or Arm bf16 flag in "
            f"{CPUINFO}): torch would emulate it, slower than fp32; {fix}"
        )
