"""The Hub-facing names in one place: cards are rendered by ``hf_sparse.cards``, folders are
pushed by ``hf_sparse.push``."""

from __future__ import annotations

from .cards import (  # noqa: F401 - re-exported public names
    card_metadata,
    load_template,
    render_adapter_card,
    render_merge_card,
    render_model_card,
)
from .push import check_upload_folder, push_to_hub  # noqa: F401 - re-exported public names
