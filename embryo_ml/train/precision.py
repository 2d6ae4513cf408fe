"""Mixed precision and memory format for a device, chosen from what the hardware can do.

bfloat16 autocast on a CPU is only fast where the CPU multiplies bf16 natively (Intel AMX or
AVX512-BF16): measured 2.17x the plain float32 loop on a Xeon with AMX, but 0.10x (ten times
slower, emulated) on an AMD EPYC with AVX2 only. So `train.amp: auto` turns bf16 on for a CPU
only when `cpu_has_native_bf16()` detects those units; it never guesses from the vendor.
`channels_last: auto` is on with CUDA only: on the AVX2 CPU it measured slower for resnet18
float32 training (1.50 vs 1.35 s a batch of 32 at 128 px).
"""

from __future__ import annotations

import torch

from embryo_ml.errors import ConfigError
from embryo_ml.train.loop import Precision


def cpu_has_native_bf16() -> bool:
    """Does this CPU have bf16 matrix units (AMX tiles or AVX512-BF16)? torch's own probes
    (what oneDNN dispatches on); False where this torch build cannot tell."""
    probes = [getattr(torch.cpu, name, None)
              for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(probe()) for probe in probes if probe is not None)


def resolve_precision(amp: str, channels_last: str | bool, device: torch.device) -> Precision:
    """`train.amp` / `train.channels_last` for `device`. `auto`: bf16 on CUDA where the GPU
    supports it (else fp16 with a gradient scaler), bf16 on a CPU with native bf16 units, float32
    otherwise. `fp16` on CPU is refused."""
    cuda = device.type == "cuda"
    if amp == "auto":
        if cuda:
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            amp = "bf16" if cpu_has_native_bf16() else "off"
    if amp == "fp16" and not cuda:
        raise ConfigError("train.amp=fp16 needs CUDA; use train.amp=bf16 or off on CPU")
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    use_nhwc = channels_last is True or (channels_last == "auto" and cuda)
    return Precision(dtype, use_nhwc, scaler)
