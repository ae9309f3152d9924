"""``scripts/bench --linux --quick`` as a smoke test: a real Linux guest on vdev's
virtio-balloon and another on QEMU's virtio-balloon-pci, side by side in one run.

No speed threshold (the machine is shared): each side reached its targets, the host got the
ballooned RAM back on both, and every figure and ratio is a finite number.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from lab.bench import linux
from lab.bench.system import MIB

pytestmark = [pytest.mark.linux_guest, pytest.mark.timeout(300)]


def _finite(x: Any, what: str) -> None:
    assert isinstance(x, int | float) and math.isfinite(x) and x >= 0, f"{what} = {x!r}"


async def test_linux_side_by_side_quick(linux_env: Any) -> None:
    balloon = 32 * MIB
    result = await linux.side_by_side(ram_mib=384, sizes=(balloon,), rounds=1, timeout=120)
    assert result["accel"] == "tcg" and result["qemu"]
    row = result["sizes"]["32 MiB"]
    for dev in ("qemu", "vdev"):
        side = row[dev]
        assert side["rounds"] == 1
        for way in ("inflate", "deflate"):
            assert side[way]["pages_per_s"] > 0, (dev, way)
            _finite(side[way]["seconds"], f"{dev} {way} s")
            _finite(side[way]["qemu_cpu_s"], f"{dev} {way} QEMU CPU")
        # the pages went back to the host: QEMU's RssShmem fell by most of the balloon
        assert side["inflate"]["rss_regained"] >= balloon // 2, (dev, side["inflate"])
    _finite(row["vdev"]["inflate"]["vdev_cpu_s"], "vdev CPU")
    assert row["qemu"]["inflate"]["vdev_cpu_s"] is None
    for way in ("inflate", "deflate"):
        _finite(row["ratio_vdev_over_qemu"][way], f"ratio {way}")
    raw = result["raw_rounds"]
    assert [r["inflate"]["pages"] for r in raw["vdev"]] == [balloon // 4096]
    assert [r["deflate"]["pages"] for r in raw["qemu"]] == [balloon // 4096]
    assert "vdev" in linux.table(result)
