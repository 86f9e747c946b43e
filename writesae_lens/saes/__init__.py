"""WriteSAEs: sparse autoencoders whose atoms are low-rank d_k x d_v matrices, for recurrent states.

Importing this package registers the architectures with SAELens ("write_topk",
"write_batchtopk", "write_jumprelu"), so `SAE.load_from_disk`, `SAE.from_dict` and
`LanguageModelSAETrainingRunner` find them by name. See docs/saes.md.
"""

from writesae_lens.saes.base import WriteSAEBase
from writesae_lens.saes.batchtopk import WriteBatchTopKTrainingSAE, WriteBatchTopKTrainingSAEConfig
from writesae_lens.saes.config_fields import WriteSAEShapeFields, WriteTrainingFields
from writesae_lens.saes.jumprelu import (
    WriteJumpReLUSAE,
    WriteJumpReLUSAEConfig,
    WriteJumpReLUTrainingSAE,
    WriteJumpReLUTrainingSAEConfig,
)
from writesae_lens.saes.paper_checkpoint import (
    PaperCheckpointError,
    convert_paper_checkpoint,
    load_paper_checkpoint,
)
from writesae_lens.saes.registration import register_write_saes
from writesae_lens.saes.topk import (
    WriteTopKSAE,
    WriteTopKSAEConfig,
    WriteTopKTrainingSAE,
    WriteTopKTrainingSAEConfig,
)
from writesae_lens.saes.training import WriteTrainingSAEBase

register_write_saes()

__all__ = [
    "PaperCheckpointError",
    "WriteBatchTopKTrainingSAE",
    "WriteBatchTopKTrainingSAEConfig",
    "WriteJumpReLUSAE",
    "WriteJumpReLUSAEConfig",
    "WriteJumpReLUTrainingSAE",
    "WriteJumpReLUTrainingSAEConfig",
    "WriteSAEBase",
    "WriteSAEShapeFields",
    "WriteTopKSAE",
    "WriteTopKSAEConfig",
    "WriteTopKTrainingSAE",
    "WriteTopKTrainingSAEConfig",
    "WriteTrainingFields",
    "WriteTrainingSAEBase",
    "convert_paper_checkpoint",
    "load_paper_checkpoint",
    "register_write_saes",
]
