"""Configuration of a Basis Sharing compressed causal language model.

Shipped inside every compressed model folder (transformers remote code), so it imports only
transformers. The folder loads with ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)``, or without remote code after ``import hf_sparse``.

Basis Sharing: Wang et al., "Basis Sharing: Cross-Layer Parameter Sharing for Large Language
Model Compression", ICLR 2025.
"""

from transformers import AutoConfig, PretrainedConfig


class BasisSharedConfig(PretrainedConfig):
    """The original model's config (``text_config``) plus the compressed layers' layout.

    ``bases``: basis key -> ``{"rank": k, "in_features": d_in}``; each basis is one ``[k, d_in]``
    matrix stored once and read by every layer of its group.
    ``layers``: module name inside the original model -> basis key; each such linear layer
    becomes ``y = coefficient(x @ basis^T)`` with its own ``[d_out, k]`` coefficient (and the
    original bias). Every other weight is the original model's.
    """

    model_type = "basis_shared"
    _auto_class = "AutoConfig"  # save_pretrained ships this file and writes auto_map
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, text_config=None, bases=None, layers=None, **kwargs):
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            if "model_type" not in text_config:
                raise ValueError(
                    "text_config has no model_type: it must be the config of the original "
                    "model (e.g. model_type: llama)"
                )
            text_config = AutoConfig.for_model(text_config.pop("model_type"), **text_config)
        self.text_config = text_config
        self.bases = {str(k): dict(v) for k, v in (bases or {}).items()}
        self.layers = {str(k): str(v) for k, v in (layers or {}).items()}
        unknown = sorted(set(self.layers.values()) - set(self.bases))
        if unknown:
            raise ValueError(f"layers name basis key(s) {unknown} that are not in bases")
        super().__init__(**kwargs)

    def get_text_config(self, *args, **kwargs):
        """The original model's config (what generation and caches read)."""
        return self.text_config if self.text_config is not None else self


__all__ = ["BasisSharedConfig"]
