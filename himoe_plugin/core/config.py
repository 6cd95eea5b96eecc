"""Validated settings of a hierarchical instance-conditioned MoE (framework-agnostic)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Sequence

import torch

#: How the experts' grouped linear layers run (see ``core/grouped_linear.py``).
EXPERT_BACKENDS = ("auto", "loop", "grouped_mm")
#: torch's grouped GEMM needs 16-byte aligned row strides: widths a multiple of 8 (16-bit types).
GROUPED_MM_ALIGNMENT = 8


class MoEConfigError(ValueError):
    """An invalid HI-MoE setting. ``key`` names the setting as the user wrote it."""

    def __init__(self, key: str, value: Any, reason: str):
        self.key = key
        self.value = value
        self.reason = reason
        super().__init__(f"{key}={value!r}: {reason}")

    def renamed(self, key_of: Callable[[str], str]) -> "MoEConfigError":
        """The same error, with the setting named the way a framework's config names it."""
        return MoEConfigError(key_of(self.key), self.value, self.reason)


def check_int(value: Any, key: str, minimum: int) -> int:
    """``value`` as an integer >= ``minimum`` (booleans are not integers); errors name ``key``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MoEConfigError(key, value, f"must be an integer >= {minimum}")
    return value


def check_number(value: Any, key: str, minimum: float, inclusive: bool = True) -> float:
    """``value`` as a finite float ``>= minimum`` (``> minimum`` unless ``inclusive``); errors
    name ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MoEConfigError(key, value, "must be a finite number")
    if value < minimum or (not inclusive and value == minimum):
        raise MoEConfigError(key, value, f"must be {'>=' if inclusive else '>'} {minimum}")
    return float(value)


def check_noise_std(value: Any, key: str) -> float:
    """``value`` (a noise std, e.g. of upcycled experts) as a finite float >= 0; errors name ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise MoEConfigError(key, value, "must be a finite number >= 0")
    return float(value)


def check_contiguous_layers(layers: Sequence[int], num_layers: int, key: str) -> None:
    """The expert block must be a non-empty, increasing, contiguous run of existing fc layers
    (0-based indices into ``num_layers``); errors name ``key``."""
    layers = list(layers)
    if not layers:
        raise MoEConfigError(key, layers, "needs at least one fc layer index")
    if any(isinstance(i, bool) or not isinstance(i, int) for i in layers) or layers != list(
        range(layers[0], layers[-1] + 1)
    ):
        raise MoEConfigError(key, layers, "must be increasing, contiguous fc layer indices")
    if layers[0] < 0 or layers[-1] >= num_layers:
        raise MoEConfigError(key, layers, f"the box head has fc layers 0..{num_layers - 1}")


def check_expert_backend(backend: Any, dims: Sequence[int] = (), key: str = "expert_backend") -> None:
    """``backend`` is one of ``EXPERT_BACKENDS`` and, when it forces ``grouped_mm``, this torch
    has a grouped GEMM and every expert layer width in ``dims`` is a multiple of 8."""
    if not isinstance(backend, str) or backend not in EXPERT_BACKENDS:
        raise MoEConfigError(key, backend, f"must be one of {list(EXPERT_BACKENDS)}")
    if backend != "grouped_mm":
        return
    if not hasattr(torch, "_grouped_mm"):
        raise MoEConfigError(
            key, backend, f"torch {torch.__version__} has no grouped GEMM (torch._grouped_mm, torch >= 2.8)"
        )
    if any(int(d) % GROUPED_MM_ALIGNMENT for d in dims):
        raise MoEConfigError(
            key, backend,
            f"torch's grouped GEMM needs 16-byte aligned rows: every expert layer width must be a "
            f"multiple of {GROUPED_MM_ALIGNMENT}, got {list(dims)}",
        )


@dataclass(frozen=True)
class MoEConfig:
    """Settings of the hierarchical router, the experts and the auxiliary losses.

    Scene level: the scene router scores ``num_groups`` expert groups per image (``num_groups=0``
    means one group per expert) and keeps the best ``scene_top_k`` groups. Instance level: every
    instance is sent to its ``top_k`` experts among the experts of its image's kept groups.
    ``instance_router=False`` routes on the scene alone (every instance of an image gets the
    same experts); ``num_groups=1`` routes on the instance alone (token-level routing).
    ``expert_backend`` picks how the experts' matmuls run: ``auto`` (torch's grouped GEMM where
    it is a real grouped kernel, CUDA sm90/sm100 in bfloat16; a loop of matmuls elsewhere),
    ``loop`` or ``grouped_mm`` (forced). ``capacity_factor`` > 0 caps the assignments each
    expert takes in training (the least confident beyond the cap are dropped);
    ``eval_capacity_factor`` does the same at inference, where it is 0 (dropless) by default, so
    that an image's predictions never depend on the other images of its batch.
    """

    num_experts: int = 8
    top_k: int = 2
    num_groups: int = 0
    scene_top_k: int = 4
    scene_temperature: float = 1.0
    scene_noise_std: float = 0.0
    instance_jitter: float = 0.0
    instance_router: bool = True
    instance_uses_scene_probs: bool = True
    shared_expert: bool = False
    shared_expert_weight: float = 0.5
    capacity_factor: float = 0.0
    eval_capacity_factor: float = 0.0
    balance_loss_weight: float = 0.01
    scene_balance_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    scene_supervision_weight: float = 0.0
    global_balance: bool = True
    expert_backend: str = "auto"

    def __post_init__(self) -> None:
        self._check_int("num_experts", minimum=1)
        self._check_int("num_groups", minimum=0)
        if self.num_groups > self.num_experts:
            self._fail("num_groups", f"more groups than experts (num_experts={self.num_experts})")
        if self.num_experts % self.groups != 0:
            self._fail("num_groups", f"must divide num_experts={self.num_experts}")
        self._check_int("scene_top_k", minimum=1)
        if self.scene_top_k > self.groups:
            self._fail(
                "scene_top_k",
                f"the scene subset cannot hold more groups than exist ({self.groups} groups "
                f"of {self.experts_per_group} experts)",
            )
        self._check_int("top_k", minimum=1)
        if self.top_k > self.subset_size:
            self._fail(
                "top_k",
                f"larger than the scene subset: scene_top_k={self.scene_top_k} groups of "
                f"{self.experts_per_group} experts leave {self.subset_size} eligible experts",
            )
        if self.instance_router is False and self.experts_per_group != 1:
            self._fail(
                "num_groups",
                "scene-only routing (instance_router=False) picks experts, not groups: "
                "use num_groups=0 (one group per expert)",
            )
        self._check_float("scene_temperature", minimum=0.0, inclusive=False)
        self._check_float("scene_noise_std", minimum=0.0)
        self._check_float("instance_jitter", minimum=0.0)
        if self.instance_jitter >= 1.0:
            self._fail("instance_jitter", "must be < 1 (inputs are scaled by U(1-eps, 1+eps))")
        self._check_float("shared_expert_weight", minimum=0.0, inclusive=False)
        if self.shared_expert_weight >= 1.0:
            self._fail("shared_expert_weight", "must be < 1 (routed experts get 1 - weight)")
        self._check_float("capacity_factor", minimum=0.0)
        self._check_float("eval_capacity_factor", minimum=0.0)
        for name in (
            "balance_loss_weight",
            "scene_balance_loss_weight",
            "z_loss_weight",
            "scene_supervision_weight",
        ):
            self._check_float(name, minimum=0.0)
        for name in ("instance_router", "instance_uses_scene_probs", "shared_expert", "global_balance"):
            if not isinstance(getattr(self, name), bool):
                self._fail(name, "must be a boolean")
        check_expert_backend(self.expert_backend)

    @property
    def groups(self) -> int:
        """Number of expert groups the scene router chooses among."""
        return self.num_groups or self.num_experts

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.groups

    @property
    def subset_size(self) -> int:
        """Number of experts eligible for the instances of one image."""
        return self.scene_top_k * self.experts_per_group

    def capacity(self, num_instances: int, training: bool = True) -> int:
        """Per-expert capacity for ``num_instances`` instances in training (``capacity_factor``)
        or at inference (``eval_capacity_factor``); 0 means dropless."""
        factor = self.capacity_factor if training else self.eval_capacity_factor
        if factor == 0.0:
            return 0
        return max(1, math.ceil(factor * num_instances * self.top_k / self.num_experts))

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], key_of: Callable[[str], str] = str
    ) -> "MoEConfig":
        """Build from a framework's config mapping; errors name keys through ``key_of``."""
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                raise MoEConfigError(key_of(key), values[key], f"unknown setting; known: {sorted(known)}")
        try:
            return cls(**dict(values))
        except MoEConfigError as err:
            raise err.renamed(key_of) from None

    def _fail(self, name: str, reason: str) -> None:
        raise MoEConfigError(name, getattr(self, name), reason)

    def _check_int(self, name: str, minimum: int) -> None:
        check_int(getattr(self, name), name, minimum)

    def _check_float(self, name: str, minimum: float, inclusive: bool = True) -> None:
        check_number(getattr(self, name), name, minimum, inclusive)
