"""Model shapes for a parameter budget: the sizes a scaling sweep trains.

A sweep varies one number, the parameter count N, so the rest of the shape must follow a
fixed rule or the fit would mix in aspect-ratio effects. The rule here is the usual one
(Kaplan et al. 2020; Hoffmann et al. 2022): a fixed head width, d_ff a fixed multiple of
d_model, and d_model / num_layers near a target aspect ratio. Small models cannot keep
the ratio exactly (one layer more multiplies N by a lot at d_model = 64 x layers), so the
search hits the size first and the aspect ratio second: among the shapes within
``tolerance`` of the target N it takes the one whose aspect ratio is closest to the rule.
Counts come from :mod:`jaxformer.flops`, the accountant the trainer logs MFU with.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from jaxformer.config import ConfigError
from jaxformer.tasks import count_flops

COUNTS = ("non_embedding", "total")


@dataclasses.dataclass(frozen=True)
class ShapeRule:
    """How a model's shape follows its size."""

    aspect: float = 64.0  # target d_model / num_layers
    head_dim: int = 32  # fixed; num_heads = d_model / head_dim
    ffn_ratio: float = 4.0  # d_ff = ffn_ratio x d_model, rounded up to ffn_multiple
    ffn_multiple: int = 16
    d_model_multiple: int = 0  # d_model steps; 0 = head_dim (whole heads)
    min_layers: int = 1  # min_layers = max_layers: a fixed-depth family, width alone grows
    max_layers: int = 64
    count: str = "non_embedding"  # which parameter count the target means: non_embedding | total
    tolerance: float = 0.1  # relative error in N accepted before the aspect ratio decides

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, where: str = "shape") -> ShapeRule:
        known = {f.name for f in dataclasses.fields(cls)}
        given = dict(cfg.items())
        for key in given:
            if key not in known:
                raise ConfigError(
                    f"sweep spec key '{where}.{key}' is unknown; known: {sorted(known)}"
                )
        rule = cls(**given)
        rule.check(where)
        return rule

    def check(self, where: str = "shape") -> None:
        positive = (
            "aspect", "head_dim", "ffn_ratio", "ffn_multiple", "min_layers", "max_layers",
            "tolerance",
        )  # fmt: skip
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(
                    f"sweep spec key '{where}.{name}' must be positive, got {getattr(self, name)}"
                )
        if self.min_layers > self.max_layers:
            raise ConfigError(
                f"sweep spec key '{where}.min_layers' ({self.min_layers}) is above "
                f"{where}.max_layers ({self.max_layers})"
            )
        if self.count not in COUNTS:
            raise ConfigError(
                f"sweep spec key '{where}.count' is {self.count!r}; choose one of {list(COUNTS)}"
            )
        step = self.d_model_multiple or self.head_dim
        if step % self.head_dim:
            raise ConfigError(
                f"sweep spec key '{where}.d_model_multiple' ({step}) must be a multiple of "
                f"{where}.head_dim ({self.head_dim}) so every head is whole"
            )


@dataclasses.dataclass(frozen=True)
class Shape:
    """One model size: the overrides that give it and the accountant's figures."""

    num_layers: int
    d_model: int
    num_heads: int
    head_dim: int
    d_ff: int
    params: int
    non_embedding_params: int
    train_flops_per_token: int

    def overrides(self) -> dict[str, Any]:
        """The ``model.*`` keys that give this shape (``head_dim`` left derived)."""
        return {
            "model.num_layers": self.num_layers,
            "model.d_model": self.d_model,
            "model.num_heads": self.num_heads,
            "model.d_ff": self.d_ff,
        }

    def counted(self, count: str) -> int:
        return self.non_embedding_params if count == "non_embedding" else self.params


def _round_up(x: float, multiple: int) -> int:
    return max(multiple, multiple * math.ceil(x / multiple - 1e-9))


def make_shape(
    model_cfg: ml_collections.ConfigDict,
    rule: ShapeRule,
    num_layers: int,
    d_model: int,
    seq_len: int,
) -> Shape:
    """The shape with this depth and width under ``rule``, counted on ``model_cfg``'s other keys."""
    m = model_cfg.copy_and_resolve_references()
    m.num_layers = num_layers
    m.d_model = d_model
    m.num_heads = d_model // rule.head_dim
    m.head_dim = 0  # d_model // num_heads == rule.head_dim
    if m.num_kv_heads and m.num_heads % m.num_kv_heads:
        m.num_kv_heads = 0  # a fixed GQA group count that does not divide falls back to MHA
    m.d_ff = _round_up(rule.ffn_ratio * d_model, rule.ffn_multiple)
    c = count_flops(m, seq_len)
    return Shape(
        num_layers,
        d_model,
        m.num_heads,
        rule.head_dim,
        m.d_ff,
        c.params,
        c.non_embedding_params,
        c.train_flops_per_token,
    )


def shape_for_params(
    target: float, model_cfg: ml_collections.ConfigDict, rule: ShapeRule, seq_len: int
) -> Shape:
    """The shape nearest ``target`` parameters (``rule.count``) under ``rule``.

    For every depth, the widths (multiples of ``d_model_multiple``) just below and just
    above the target; of those within 2x of the aspect ratio and within ``tolerance`` of
    the target N (widened by half again until one is), the one closest to the aspect ratio.
    """
    if not target > 0:
        raise ConfigError(f"target parameter count must be positive, got {target}")
    step = rule.d_model_multiple or rule.head_dim
    candidates: list[Shape] = []
    for layers in range(rule.min_layers, rule.max_layers + 1):
        below: Shape | None = None
        width = step
        while True:  # the widths just below and just above the target
            shape = make_shape(model_cfg, rule, layers, width, seq_len)
            if shape.counted(rule.count) >= target:
                break
            below, width = shape, width + step
        candidates += [s for s in (below, shape) if s is not None]
        if below is None and shape.counted(rule.count) > target * 2:
            break  # deeper models at the narrowest width only grow further away

    def miss(s: Shape) -> float:
        return abs(math.log(s.counted(rule.count) / target))

    def off_aspect(s: Shape) -> float:
        return abs(math.log(s.d_model / s.num_layers / rule.aspect))

    # Shapes within 2x of the aspect ratio if there are any (else a 1-layer or a very deep
    # model could win on size alone); among them the size first, widening the tolerance
    # until some shape is within it, then the aspect ratio.
    pool = candidates
    if rule.min_layers < rule.max_layers:
        pool = [s for s in candidates if off_aspect(s) <= math.log(2)] or candidates
    tolerance = rule.tolerance
    while True:
        close = [s for s in pool if miss(s) <= math.log1p(tolerance)]
        if close:
            return min(close, key=lambda s: (off_aspect(s), miss(s)))
        tolerance *= 1.5
