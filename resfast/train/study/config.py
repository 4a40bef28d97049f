"""What the study runs: the models (:class:`ModelSpec`), each comparison's budget
(:class:`Comparison`) and the scales (:data:`SCALES`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

from torch import nn

from resfast.models import PreActResNet, densenet_bc, wide_resnet

__all__ = ["SECTIONS", "ModelSpec", "Comparison", "Scale", "SCALES", "CARDINALITY_TABLE", "with_epochs"]

SECTIONS = ("target", "wide_vs_deep", "dropout", "resnext", "densenet")

# The ResNeXt paper's Table 2: (cardinality C, bottleneck width d) at the complexity of ResNet-50.
CARDINALITY_TABLE = ((1, 64), (2, 40), (4, 24), (8, 14), (32, 4))


@dataclass(frozen=True)
class ModelSpec:
    """One model of the study: a registered name, or a family's builder with its sizes
    (the small analogues the registry does not hold), and the options it is trained with."""

    label: str
    model: Union[str, Callable[..., nn.Module]]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    dropout: Optional[float] = None

    def build(self, num_classes: int, backend: str, **options: Any) -> nn.Module:
        """The model, with ``backend`` (and ``options``: ``memory``, ``recompute``) given where
        its family takes them (:data:`resfast.models.FAMILY_OPTIONS`)."""
        from resfast.models import create_model, model_options
        from resfast.train.loop import model_kwargs

        kwargs = model_kwargs(self.model, num_classes, backend=backend, dropout=self.dropout)
        declared = model_options(self.model)
        kwargs.update({declared[k]: v for k, v in options.items() if k in declared})
        if isinstance(self.model, str):
            return create_model(self.model, **kwargs, **self.kwargs)
        return self.model(**self.kwargs, **kwargs)

    def describe(self) -> str:
        """How the model is built, e.g. ``wide_resnet(depth=16, width=4)`` or ``wrn16_2``."""
        if isinstance(self.model, str) and not self.kwargs:
            return self.model
        name = self.model if isinstance(self.model, str) else self.model.__name__
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{name}({args})"


@dataclass(frozen=True)
class Comparison:
    """Two models trained together, interleaved step by step, on the same batches. The
    budget (``epochs``, peak ``lr``) is one at which the ``baseline`` learns the task (reaches
    the scale's ``learned_acc``); where it does not, the study draws no conclusion."""

    baseline: ModelSpec
    other: ModelSpec
    epochs: int
    lr: float


@dataclass(frozen=True)
class Scale:
    """What one scale of the study trains and measures."""

    name: str
    data: str
    image_size: int  # digits are upsampled to this (their originals are 8x8); CIFAR stays 32
    subset: Optional[int]  # first N train / test images, None for all
    batch_size: int
    #: Test accuracy at which a model counts as having learned the task.
    learned_acc: float
    target: Optional[Tuple[str, int]]  # (registered model, epochs) of the digits target at 32x32
    wide_vs_deep: Comparison  # baseline: the deep, thin network
    paper_pair: Tuple[str, ...]  # the papers' pair, parameters only, when it is not trained here
    dropout: Comparison  # baseline: no dropout
    #: ResNeXt analogue (depth, cardinality, width) and its budget; the baseline is the same
    #: network with one group, its width chosen for equal parameters.
    resnext: Tuple[int, int, int]
    resnext_budget: Tuple[int, float]  # (epochs, lr)
    memory_model: ModelSpec
    memory_batch: int
    memory_image: int
    sweep_layers: Tuple[int, ...]
    sweep_shape: Dict[str, int] = field(default_factory=dict)  # block_memory_sweep's shape, if not its default
    #: Interleaved rounds of the memory modes' step-time comparison (0: not timed).
    memory_time_rounds: int = 5


def with_epochs(scale: Scale, epochs: int) -> Scale:
    """``scale`` with every comparison trained for ``epochs`` (``resfast study --epochs``)."""
    return dataclasses.replace(scale, wide_vs_deep=dataclasses.replace(scale.wide_vs_deep, epochs=epochs),
                               dropout=dataclasses.replace(scale.dropout, epochs=epochs),
                               resnext_budget=(epochs, scale.resnext_budget[1]))


def _wrn(depth: int, width: int, dropout: Optional[float] = None) -> ModelSpec:
    label = f"WRN-{depth}-{width}" + (f", dropout {dropout:g}" if dropout is not None else "")
    return ModelSpec(label, wide_resnet, {"depth": depth, "width": width}, dropout)


def _preact(depth: int) -> ModelSpec:
    return ModelSpec(f"pre-act ResNet-{depth}", PreActResNet, {"depth": depth})


SCALES: Dict[str, Scale] = {
    # Micro scale for the test suite: every section runs, on a handful of images; nothing
    # learns in one epoch on 64 images, so every comparison says so and concludes nothing.
    "tiny": Scale(
        "tiny", "digits", 8, 64, 32, 0.9, None,
        wide_vs_deep=Comparison(_preact(11), _wrn(10, 2), epochs=1, lr=0.1), paper_pair=(),
        dropout=Comparison(_wrn(10, 1, 0.0), _wrn(10, 1, 0.3), epochs=1, lr=0.1),
        resnext=(11, 2, 2), resnext_budget=(1, 0.05),
        memory_model=ModelSpec("DenseNet-BC-10 (k=4)", densenet_bc, {"depth": 10, "growth_rate": 4}),
        memory_batch=2, memory_image=8, sweep_layers=(1, 2, 3),
        sweep_shape={"num_input_features": 8, "growth_rate": 4, "image_size": 8}, memory_time_rounds=2),
    "small": Scale(
        "small", "digits", 16, None, 32, 0.9, ("wrn16_2", 3),
        wide_vs_deep=Comparison(_preact(56), _wrn(16, 2), epochs=4, lr=0.1),
        paper_pair=("wrn16_4", "preact_resnet164", "wrn40_4", "preact_resnet1001"),
        dropout=Comparison(_wrn(16, 2, 0.0), _wrn(16, 2, 0.3), epochs=4, lr=0.1),
        resnext=(11, 8, 4), resnext_budget=(5, 0.02),
        memory_model=ModelSpec("densenet_bc100_k12", "densenet_bc100_k12"),
        memory_batch=16, memory_image=32, sweep_layers=(4, 8, 16, 24, 32)),
    "full": Scale(
        "full", "cifar10", 32, None, 128, 0.8, None,
        wide_vs_deep=Comparison(ModelSpec("pre-act ResNet-1001", "preact_resnet1001"), ModelSpec("WRN-40-4", "wrn40_4"),
                                epochs=30, lr=0.1),
        paper_pair=("wrn16_4", "preact_resnet164"),
        dropout=Comparison(ModelSpec("WRN-16-8, dropout 0", "wrn16_8", dropout=0.0),
                           ModelSpec("WRN-16-8, dropout 0.3", "wrn16_8", dropout=0.3), epochs=30, lr=0.1),
        resnext=(29, 8, 64), resnext_budget=(30, 0.1),
        memory_model=ModelSpec("densenet_bc100_k12", "densenet_bc100_k12"),
        memory_batch=64, memory_image=32, sweep_layers=(4, 8, 16, 24, 32, 48, 64)),
}
