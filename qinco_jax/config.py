"""Model configuration: plain, frozen dataclasses.

The jitted kernels never read these: they derive every size from the shapes of the
parameter pytree. A config exists to build parameters, to name a model in files and
on the command line, and to check that files that must agree (model, index, codes) do.
"""

from __future__ import annotations

import dataclasses
import math

VARIANTS = ("qinco", "lowrank", "ivf")
ARCHS = ("qinco", "qinco2")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QincoArch:
    """The architecture of a QINCo quantizer: what a QincoConfig holds apart from what
    the data decides (d, K_IVF, db_scale). Shared by QincoConfig and the training spec
    (qinco_jax.training.recipe.ModelSpec), so both have the same fields and defaults.

    K: codebook size of the neural steps (256 in all published models).
    M: number of codes per vector for QINCo / QINCo-LR. For IVF-QINCo, the number of
       neural steps *after* the IVF step, so an IVF code has M + 1 entries (as in the
       reference, where `IVFQINCo.M` counts the steps and codes have M + 1 columns).
    L: residual blocks per step.   h: hidden width of those blocks.
    variant: "qinco", "lowrank" (QINCo-LR: concat block 2d -> h -> d, no bias) or
       "ivf" (step 0 is a frozen IVF codebook of K_IVF centroids).
    arch: "qinco" (QINCo v1, the ICML 2024 model and file format) or "qinco2" (ICLR
       2025: projections, outer skip, substep codebooks, mean/std normalisation).
    de: QINCo2 embedding width of the step networks; 0 means d (no in/out projection).
    A, B: QINCo2's encoding defaults: A codeword candidates pre-selected per beam entry
       by the substep codebook (0 = all K, no substep codebook) and a beam of B.
    qinco1_mode: a QINCo2 model without the outer skip (the step adds the network's
       output alone, as QINCo v1 does).
    """

    K: int = 256
    M: int = 8
    L: int = 2
    h: int = 256
    variant: str = "qinco"
    arch: str = "qinco"
    de: int = 0
    A: int = 0
    B: int = 1
    qinco1_mode: bool = False

    @property
    def is_ivf(self) -> bool:
        return self.variant == "ivf"

    @property
    def is_qinco2(self) -> bool:
        return self.arch == "qinco2"


@dataclasses.dataclass(frozen=True)
class QincoConfig(QincoArch):
    """One QINCo quantizer: its architecture (QincoArch's fields, keyword-only) and
    what the data decides:

    d: vector dimension.
    K_IVF: IVF centroids of an "ivf" variant (0 otherwise).
    db_scale: inputs are divided by it before quantization, outputs multiplied (QINCo v1;
       QINCo2 models normalise with the per-dimension mean and scalar std stored in
       their parameters, see model.Normalisation, and keep db_scale = 1).
    """

    d: int
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
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.de < 0 or self.A < 0 or self.B < 1:
            raise ValueError(f"need de >= 0, A >= 0 and B >= 1, got de={self.de} A={self.A} B={self.B}")
        if self.arch == "qinco":
            if (self.de not in (0, self.d) or self.A or self.B != 1 or self.qinco1_mode):
                raise ValueError("de, A, B and qinco1_mode are QINCo2 settings (arch='qinco2'); a QINCo v1 "
                                 f"model has de=d, A=0, B=1, got de={self.de} A={self.A} B={self.B} "
                                 f"qinco1_mode={self.qinco1_mode}")
        else:
            if self.variant == "lowrank":
                raise ValueError("QINCo2 has no low-rank (QINCo-LR) variant")
            if self.db_scale != 1.0:
                raise ValueError("a QINCo2 model normalises with its stored mean and std: db_scale must be 1")

    @property
    def embed_dim(self) -> int:
        """Width De of the step networks (d unless QINCo2 projects to de)."""
        return self.de or self.d

    @property
    def has_projections(self) -> bool:
        return self.embed_dim != self.d

    @property
    def outer_skip(self) -> bool:
        """Whether a step adds codeword + network output (QINCo2) or the output alone."""
        return self.is_qinco2 and not self.qinco1_mode

    @property
    def has_substep(self) -> bool:
        """Whether every neural step owns a substep codebook (QINCo2 with A > 0)."""
        return self.is_qinco2 and self.A > 0

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
        if self.is_qinco2:
            ivf = f"IVF{self.K_IVF}-" if self.is_ivf else ""
            mode = " qinco1_mode" if self.qinco1_mode else ""
            return (f"{ivf}QINCo2 d={self.d} M={self.M} K={self.K} L={self.L} de={self.embed_dim} "
                    f"dh={self.h} A={self.A} B={self.B}{mode}")
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
PRESELECT_PROXIES = ("linear", "codebook", "substep")


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    """How vectors are encoded, wherever they are (codec, index building, training,
    evaluation, the command lines): the one place these options are checked.

    beam: partial codes kept per step (1 = greedy, as the reference encodes).
    preselect: codewords the network runs on per step, pre-selected by `proxy`
        (0 = all K).
    proxy: how pre-selection ranks codewords: "linear" (a least-squares linear proxy
        of the step), "codebook" (distance to the step's codebook) or "substep"
        (distance to QINCo2's substep codebook, as QINCo2 pre-selects).
    None in any of these three means "the model's default" (see
    `qinco_jax.models.codec.model_encode_defaults`), filled in by `resolved`.
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
