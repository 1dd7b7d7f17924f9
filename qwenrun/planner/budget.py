"""How much of the machine (and its workers) a plan may use: a `Budget`, one `Target` each.

Contract: pure. `Budget.from_hw(hw)` lists the devices (`targets.targets_of`); `fits(use)`
says whether a `costs.Usage` stays within every device's own budget. The one-GPU search
reads the sums (`gpu`, `ram`); a spread reads each target.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwenrun.hwprobe import HardwareProfile
from qwenrun.planner.costs import Usage
from qwenrun.planner.targets import Target, targets_of


@dataclass(frozen=True)
class Budget:
    """How much of the machine (and its workers) a plan may use: one `Target` per device."""

    targets: tuple[Target, ...]

    @classmethod
    def from_hw(cls, hw: HardwareProfile) -> Budget:
        from qwenrun.planner.speed import cpu_bandwidth

        return cls(targets_of(hw, cpu_bandwidth(hw)[0]))

    @property
    def local_gpus(self) -> tuple[Target, ...]:
        return tuple(t for t in self.targets if t.kind == "gpu")

    @property
    def ram_target(self) -> Target:
        """This machine's RAM."""
        return next(t for t in self.targets if t.kind == "cpu")

    @property
    def spread(self) -> bool:
        """Several devices take layers (GPUs, workers): the search of `planner/spread.py`."""
        return len(self.local_gpus) > 1 or any(t.remote for t in self.targets)

    @property
    def n_gpus(self) -> int:
        return len(self.local_gpus)

    @property
    def has_gpu(self) -> bool:
        return self.n_gpus > 0

    @property
    def gpu_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.local_gpus)

    @property
    def gpu_capacity(self) -> int:
        return sum(t.capacity for t in self.local_gpus)

    @property
    def gpu_reserved(self) -> int:
        return sum(t.reserved for t in self.local_gpus)

    @property
    def gpu(self) -> int:
        return sum(t.budget for t in self.local_gpus)

    @property
    def ram_capacity(self) -> int:
        return self.ram_target.capacity

    @property
    def ram_reserved(self) -> int:
        return self.ram_target.reserved

    @property
    def ram(self) -> int:
        return self.ram_target.budget

    @property
    def total(self) -> int:
        """Every device's budget together: what no plan can exceed."""
        return sum(t.budget for t in self.targets)

    def fits(self, use: Usage) -> bool:
        if use.devices:
            return all(b.used <= t.budget for b, t in zip(use.devices, self.targets, strict=True))
        return use.gpu.used <= self.gpu and use.cpu.used <= self.ram
