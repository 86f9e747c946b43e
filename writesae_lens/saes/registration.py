"""Register the WriteSAE architectures with SAELens, once.

After `register_write_saes()` (run on `import writesae_lens.saes`), `SAE.load_from_disk`,
`SAE.from_dict`, `TrainingSAE.from_dict` and `LanguageModelSAETrainingRunner` find the classes by
architecture name:

    inference registry: write_topk, write_jumprelu
    training registry:  write_topk, write_batchtopk (saves as write_jumprelu), write_jumprelu
"""

from typing import Any

from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)

from writesae_lens.saes.batchtopk import WriteBatchTopKTrainingSAE, WriteBatchTopKTrainingSAEConfig
from writesae_lens.saes.jumprelu import (
    WriteJumpReLUSAE,
    WriteJumpReLUSAEConfig,
    WriteJumpReLUTrainingSAE,
    WriteJumpReLUTrainingSAEConfig,
)
from writesae_lens.saes.topk import (
    WriteTopKSAE,
    WriteTopKSAEConfig,
    WriteTopKTrainingSAE,
    WriteTopKTrainingSAEConfig,
)

INFERENCE_ARCHITECTURES: dict[str, tuple[type, type]] = {
    "write_topk": (WriteTopKSAE, WriteTopKSAEConfig),
    "write_jumprelu": (WriteJumpReLUSAE, WriteJumpReLUSAEConfig),
}
TRAINING_ARCHITECTURES: dict[str, tuple[type, type]] = {
    "write_topk": (WriteTopKTrainingSAE, WriteTopKTrainingSAEConfig),
    "write_batchtopk": (WriteBatchTopKTrainingSAE, WriteBatchTopKTrainingSAEConfig),
    "write_jumprelu": (WriteJumpReLUTrainingSAE, WriteJumpReLUTrainingSAEConfig),
}


def _same_definition(a: type, b: type) -> bool:
    """True for the same class, or the same class re-created by a module reload."""
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def _register_once(
    registry: dict[str, tuple[Any, Any]],
    register: Any,
    name: str,
    classes: tuple[type, type],
) -> None:
    existing = registry.get(name)
    if existing is None:
        register(name, *classes)
        return
    if all(_same_definition(old, new) for old, new in zip(existing, classes)):
        registry[name] = classes  # a reload: point the name at the current class objects
        return
    raise ValueError(
        f"SAELens architecture name {name!r} is already registered to "
        f"{existing[0].__module__}.{existing[0].__qualname__}, not to the WriteSAE class "
        f"{classes[0].__qualname__}."
    )


def register_write_saes() -> None:
    """Register every WriteSAE architecture with SAELens; calling it again is harmless.

    Also makes SAELens' `run_evals` splice one head of `hook_state` for its CE / KL metrics
    (`evaluation.sae_evals.install_sae_lens_state_splice`).
    """
    from writesae_lens.evaluation.sae_evals import install_sae_lens_state_splice

    install_sae_lens_state_splice()
    for name, classes in INFERENCE_ARCHITECTURES.items():
        _register_once(SAE_CLASS_REGISTRY, register_sae_class, name, classes)
    for name, classes in TRAINING_ARCHITECTURES.items():
        _register_once(SAE_TRAINING_CLASS_REGISTRY, register_sae_training_class, name, classes)
