"""timm-registered models of m2mKD, each split into stages (docs/design.md §2.5).

Importing this package registers every model with timm, so afterwards
``timm.create_model(name, pretrained=False, num_classes=...)`` works for:

* ``staged_<timm vit/deit name>``, ``staged_vit_micro``: teachers (:mod:`.vit_stages`);
* ``meta_<same names>``: Deep-Incubation meta models, one block per stage;
* ``vmoe_*``: V-MoE (:mod:`.vmoe`);
* ``nac_*``: Neural Attentive Circuits (:mod:`.nac`).

Every model has ``num_stages``, ``stages`` (views sharing its parameters) and
``forward(x, start=0, end=None)`` running stages ``[start, end)``.
"""

from .stages import ModelStage, split_depth
from .vit_stages import StagedVisionTransformer, as_staged
from .vmoe import VisionMoE, VMoEMLP, moe_block_indices
from .nac import NACState, NeuralAttentiveCircuit
from . import graph_priors

__all__ = ["ModelStage", "split_depth", "StagedVisionTransformer", "as_staged", "VisionMoE", "VMoEMLP",
           "moe_block_indices", "NACState", "NeuralAttentiveCircuit", "graph_priors"]
