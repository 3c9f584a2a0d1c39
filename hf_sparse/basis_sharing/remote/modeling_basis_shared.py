"""A Basis Sharing compressed causal language model, runnable with transformers alone.

Shipped inside every compressed model folder (transformers remote code): it imports only torch
and transformers. ``BasisSharedForCausalLM`` builds the original architecture from
``config.text_config`` (any decoder-only family transformers knows) and replaces each
compressed linear layer by ``SharedBasisLinear``: ``y = coefficient(x @ basis^T) (+ bias)``, where
the ``[k, d_in]`` basis is held once by the model (``bases``) and read by every layer of its group.

Basis Sharing: Wang et al., "Basis Sharing: Cross-Layer Parameter Sharing for Large Language
Model Compression", ICLR 2025.
"""

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .configuration_basis_shared import BasisSharedConfig


def _linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, has_bias)`` of an ``nn.Linear`` or GPT-2 ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.bias is not None
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf, module.bias is not None
    raise TypeError(f"can only compress nn.Linear or Conv1D layers, got {type(module).__name__}")


class SharedBasisLinear(nn.Module):
    """``y = coefficient(basis(x))``; ``basis`` (``d_in -> k``, no bias) is shared by a group.

    The basis module is looked up by key in the model's ``bases`` on every call, and is not
    registered here, so it is stored (and saved) once however many layers read it.
    """

    def __init__(
        self, bank: nn.ModuleDict, key: str, rank: int, out_features: int, bias: bool
    ) -> None:
        super().__init__()
        object.__setattr__(self, "_bank", bank)
        self.key = key
        self.coefficient = nn.Linear(rank, out_features, bias=bias)

    @property
    def basis(self) -> nn.Linear:
        return self._bank[self.key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.basis(x)
        if z.device != x.device:  # the basis sits elsewhere under a multi-device map
            z = z.to(x.device)
        return self.coefficient(z)

    def extra_repr(self) -> str:
        return f"basis={self.key!r}"


class BasisSharedPreTrainedModel(PreTrainedModel):
    config_class = BasisSharedConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class BasisSharedForCausalLM(BasisSharedPreTrainedModel, GenerationMixin):
    """The original causal LM (``self.lm``) with shared-basis layers; shared bases in ``bases``.

    ``save_pretrained`` copies this file and the configuration file into the folder and writes
    ``auto_map`` (``_auto_class``), so a re-saved (e.g. fine-tuned) model stays loadable with
    ``trust_remote_code=True`` alone.
    """

    _auto_class = "AutoModelForCausalLM"

    def __init__(self, config: BasisSharedConfig) -> None:
        super().__init__(config)
        if config.text_config is None:
            raise ValueError("config.text_config is missing: the original model's config")
        self.lm = AutoModelForCausalLM.from_config(config.text_config)
        self.bases = nn.ModuleDict(
            {
                key: nn.Linear(int(spec["in_features"]), int(spec["rank"]), bias=False)
                for key, spec in config.bases.items()
            }
        )
        for name, key in config.layers.items():
            parent_name, _, leaf = name.rpartition(".")
            parent = self.lm.get_submodule(parent_name)
            dense = getattr(parent, leaf)
            d_in, d_out, bias = _linear_shape(dense)
            if d_in != self.bases[key].in_features:
                raise ValueError(
                    f"{name} reads {d_in} features but basis {key!r} is "
                    f"[{self.bases[key].out_features}, {self.bases[key].in_features}]"
                )
            layer = SharedBasisLinear(self.bases, key, self.bases[key].out_features, d_out, bias)
            setattr(parent, leaf, layer)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.lm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.lm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.lm.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm.set_output_embeddings(value)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ):
        given = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "past_key_values": past_key_values,
            "inputs_embeds": inputs_embeds,
            "labels": labels,
            "use_cache": use_cache,
        }
        kwargs.update({k: v for k, v in given.items() if v is not None})
        return self.lm(**kwargs)

    def generate(self, *args, **kwargs):
        """The original architecture's ``generate`` (its own caches) with this folder's
        generation config."""
        self.lm.generation_config = self.generation_config
        return self.lm.generate(*args, **kwargs)


__all__ = ["BasisSharedForCausalLM", "BasisSharedPreTrainedModel", "SharedBasisLinear"]
