"""Training precision that follows the hardware.

``ranker fit`` without ``--trainer.precision`` trains in ``bf16-mixed`` where bf16 matmuls are
native and in ``32-true`` elsewhere:

- a GPU of compute capability 8.0 or more (Ampere and later): bf16 tensor cores;
- a CPU with AMX tiles (Intel Sapphire Rapids and later): oneDNN runs bf16 matmuls on them,
  about 6x its fp32 rate (``benchmarks/RESULTS.md``); AVX-512 BF16 alone is not chosen (its
  dot products gain little over fp32 at our layer sizes, unmeasured here).

Under ``bf16-mixed`` the weights, the embedding tables and every optimiser state stay fp32
(autocast runs the matmuls in bf16, the lookups and the loss in fp32), so checkpoints,
calibration, evaluation and export are those of an fp32 run. An explicit
``--trainer.precision`` (``32-true`` to keep fp32 on an AMX machine) always wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BF16, FP32 = "bf16-mixed", "32-true"


@dataclass(frozen=True)
class Hardware:
    """What the precision rule reads: the device training runs on and its bf16 support."""

    device: str  # "cpu" or "cuda"
    cuda_capability: tuple[int, int] | None = None
    amx: bool = False

    @classmethod
    def probe(cls, accelerator: str) -> Hardware:
        """The device ``--trainer.accelerator`` resolves to (``auto``: a GPU if there is one)."""
        cuda = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        if cuda:
            return cls("cuda", cuda_capability=torch.cuda.get_device_capability())
        # torch's own probe of the CPU's AMX tiles (cpuinfo), private but stable since 2.3.
        probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return cls("cpu", amx=bool(probe and probe()))


def default_precision(hardware: Hardware) -> tuple[str, str]:
    """(precision, why) for a run that did not choose one."""
    if hardware.device == "cuda":
        capability = hardware.cuda_capability or (0, 0)
        name = f"GPU of compute capability {capability[0]}.{capability[1]}"
        if capability >= (8, 0):
            return BF16, f"{name}: native bf16"
        return FP32, f"{name}: no native bf16 (8.0 or more needed)"
    if hardware.amx:
        return BF16, "CPU with AMX: native bf16 matmuls"
    return FP32, "CPU without AMX: no native bf16 matmuls"
