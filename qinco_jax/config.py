"""Model configuration: plain, frozen dataclasses.

The jitted kernels never read these: they derive every size from the shapes of the
parameter pytree. A config exists to build parameters, to name a model in files and
on the command line, and to check that files that must agree (model, index, codes) do.
"""

from __future__ import annotations

import dataclasses
import math

VARIANTS = ("qinco", "lowrank", "ivf")


@dataclasses.dataclass(frozen=True)
class QincoConfig:
    """One QINCo quantizer.

    d: vector dimension.
    K: codebook size of the neural steps (256 in all published models).
    M: number of codes per vector for QINCo / QINCo-LR. For IVF-QINCo, the number of
       neural steps *after* the IVF step, so an IVF code has M + 1 entries (as in the
       reference, where `IVFQINCo.M` counts the steps and codes have M + 1 columns).
    L: residual blocks per step.   h: hidden width of those blocks.
    variant: "qinco", "lowrank" (QINCo-LR: concat block 2d -> h -> d, no bias) or
       "ivf" (step 0 is a frozen IVF codebook of K_IVF centroids).
    db_scale: inputs are divided by it before quantization, outputs multiplied.
    """

    d: int
    K: int = 256
    M: int = 8
    L: int = 2
    h: int = 256
    variant: str = "qinco"
    K_IVF: int = 0
    db_scale: float = 1.0

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        for name in ("d", "K", "M", "h"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.L < 0:
            raise ValueError(f"L must be >= 0, got {self.L}")
        if self.variant == "ivf" and self.K_IVF < 1:
            raise ValueError("an IVF model needs K_IVF >= 1")
        if self.variant != "ivf" and self.K_IVF:
            raise ValueError(f"K_IVF={self.K_IVF} given for a non-IVF variant {self.variant!r}")
        if not (self.db_scale > 0 and math.isfinite(self.db_scale)):
            raise ValueError(f"db_scale must be a positive finite number, got {self.db_scale}")

    @property
    def is_ivf(self) -> bool:
        return self.variant == "ivf"

    @property
    def num_steps(self) -> int:
        """Neural steps: all but the plain codebook0 step."""
        return self.M if self.is_ivf else self.M - 1

    @property
    def code_width(self) -> int:
        """Number of integer codes per vector (IVF list number included)."""
        return self.M + 1 if self.is_ivf else self.M

    @property
    def codebook0_size(self) -> int:
        return self.K_IVF if self.is_ivf else self.K

    @property
    def code_sizes(self) -> tuple[int, ...]:
        """Number of possible values of each code column."""
        return (self.codebook0_size,) + (self.K,) * self.num_steps

    def describe(self) -> str:
        kind = {"qinco": "QINCo", "lowrank": "QINCo-LR", "ivf": f"IVF{self.K_IVF}-QINCo"}
        return (f"{kind[self.variant]} d={self.d} M={self.M} K={self.K} L={self.L} "
                f"h={self.h} db_scale={self.db_scale:g}")


@dataclasses.dataclass(frozen=True)
class PQConfig:
    """PQ-QINCo: the vector (optionally OPQ-rotated) is cut into consecutive
    sub-vectors, each quantized by its own QINCo model; codes are concatenated.

    opq_d_in: input dimension of the OPQ matrix, 0 when there is none. The matrix is
    (sum of the sub-quantizers' d) x opq_d_in."""

    subs: tuple[QincoConfig, ...]
    opq_d_in: int = 0

    def __post_init__(self):
        if not self.subs:
            raise ValueError("PQ-QINCo needs at least one sub-quantizer")
        if any(s.is_ivf for s in self.subs):
            raise ValueError("PQ-QINCo sub-quantizers cannot be IVF models")

    @property
    def has_opq(self) -> bool:
        return self.opq_d_in > 0

    @property
    def d(self) -> int:
        return self.opq_d_in or sum(s.d for s in self.subs)

    @property
    def code_width(self) -> int:
        return sum(s.code_width for s in self.subs)

    @property
    def code_sizes(self) -> tuple[int, ...]:
        return tuple(k for s in self.subs for k in s.code_sizes)

    def describe(self) -> str:
        opq = " + OPQ" if self.has_opq else ""
        return f"PQ-QINCo{opq} of {len(self.subs)}: " + "; ".join(s.describe() for s in self.subs)


ENCODE_DTYPES = ("float32", "float16", "bfloat16")
PRESELECT_PROXIES = ("linear", "codebook")


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    """How vectors are encoded, wherever they are (codec, index building, training,
    evaluation, the command lines): the one place these options are checked.

    beam: partial codes kept per step (1 = greedy, as the reference encodes).
    preselect: codewords the network runs on per step, pre-selected by `proxy`
        (0 = all K).
    proxy: how pre-selection ranks codewords: "linear" (a least-squares linear proxy
        of the step) or "codebook" (distance to the step's codebook).
    None in any of these three means "the model's default" (see
    `qinco_jax.codec.model_encode_defaults`), filled in by `resolved`.
    dtype: precision of the network (distances are always float32).
    batch_size: rows per jitted batch; None sizes it from the model to bound memory.
    """

    beam: int | None = None
    preselect: int | None = None
    proxy: str | None = None
    dtype: str = "float32"
    batch_size: int | None = None

    def __post_init__(self):
        if self.beam is not None and self.beam < 1:
            raise ValueError(f"beam size must be >= 1, got {self.beam}")
        if self.preselect is not None and self.preselect < 0:
            raise ValueError(f"preselect must be >= 0 (0 = all K codewords), got {self.preselect}")
        if self.proxy is not None and self.proxy not in PRESELECT_PROXIES:
            raise ValueError(f"pre-selection proxy must be one of {PRESELECT_PROXIES}, got {self.proxy!r}")
        if self.dtype not in ENCODE_DTYPES:
            raise ValueError(f"dtype must be one of {ENCODE_DTYPES}, got {self.dtype!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")

    def resolved(self, beam: int, preselect: int, proxy: str) -> "EncodeOptions":
        """These options with every None replaced by the given (model) defaults."""
        return dataclasses.replace(
            self, beam=self.beam if self.beam is not None else beam,
            preselect=self.preselect if self.preselect is not None else preselect,
            proxy=self.proxy if self.proxy is not None else proxy)
