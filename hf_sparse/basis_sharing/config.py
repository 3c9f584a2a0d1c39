"""What the user sets for Basis Sharing (PEFT type ``BASIS_SHARING``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config_utils import help_field
from ..integrity import IntegrityCheckedConfig
from ..models import ROLES
from ..peft_registry import add_peft_type

PEFT_TYPE_NAME = "BASIS_SHARING"
BASIS_SHARING = add_peft_type(PEFT_TYPE_NAME)

# The paper's default: input-side projections share a basis, output projections stay private
# (their inputs differ too much across layers). OPT/GPT-2 names map onto the same idea.
DEFAULT_SHARED_ROLES = ("q", "k", "v", "qkv", "gate", "up", "gate_up", "fc1")
DEFAULT_TARGET_ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "fc1", "fc2")


@dataclass
class BasisSharingConfig(IntegrityCheckedConfig):
    """Compress linear layers into shared bases + per-layer coefficients.

    Wang et al., "Basis Sharing: Cross-Layer Parameter Sharing for Large Language Model
    Compression", ICLR 2025: each weight is whitened with the Cholesky factor of its input
    statistics ``X^T X``, the whitened weights of ``group_size`` consecutive layers are stacked
    and decomposed by one SVD; the group keeps one basis (``k x d_in``, stored once on the tuner)
    and each layer keeps its coefficients (``d_out x k``). ``group_size=1`` (or a role outside
    ``shared_roles``) is the per-layer whitened SVD of SVD-LLM; ``whitening=False`` is plain SVD.

    Loading: ``import hf_sparse.basis_sharing`` first (it adds ``BASIS_SHARING`` to peft);
    without it ``PeftModel.from_pretrained`` fails with ``KeyError: 'BASIS_SHARING'``. A saved
    config holds the resolved plan (``layer_groups``, ``group_ranks``), so the adapter's shapes
    follow from the config and the base model alone.

    Example::

        config = BasisSharingConfig(ratio=0.2, group_size=2)
        model = get_basis_sharing_model(base_model, config, calibration=windows)

    YAML (``recipes/basis-sharing-20.yaml``)::

        basis_sharing:
          {ratio: 0.2, group_size: 4, shared_roles: [gate, up, down], layer_refit: true}
    """

    ratio: float = help_field(
        "Share of the parameters of every targeted matrix (per group) to remove, in (0, 1). "
        "The rank of a group of n [d_out, d_in] matrices is "
        "floor((1 - ratio) * d_in * d_out * n / (d_in + d_out * n)).",
        0.2,
    )
    group_size: int = help_field(
        "Consecutive layers sharing one basis for the roles in shared_roles (the last group is "
        "smaller when the layer count is not a multiple). 1 = per-layer SVD everywhere.",
        2,
    )
    target_roles: list[str] | None = help_field(
        f"Roles to compress ({', '.join(ROLES)}). None = every role this architecture has.",
        None,
    )
    shared_roles: list[str] | None = help_field(
        "Roles whose bases are shared across a group; the other targeted roles get a private "
        f"basis per layer. None = the paper's choice {list(DEFAULT_SHARED_ROLES)} (those present). "
        "On SmolLM2-135M, MLP roles only (group_size 4, layer_refit) did best (RESULTS.md).",
        None,
    )
    private_blocks: list[int] | None = help_field(
        "Decoder-block indices (0-based) whose layers keep a private basis for every role; the "
        "other blocks form the groups, in order. E.g. [0]: the first block reads the embeddings, "
        "and on SmolLM2-135M sharing its basis with block 1 raises its whitened error 2-3.6x "
        "for q, k, v and o.",
        None,
    )
    role_ratios: dict[str, float] | None = help_field(
        "Per-role overrides of ratio, e.g. {down: 0.1}.", None
    )
    whitening: bool = help_field(
        "True: whiten with the Cholesky factor of X^T X (needs calibration data). False: plain "
        "SVD of the weights (no data needed).",
        True,
    )
    damping: float = help_field(
        "Added to X^T X as damping * mean(diag) before the float64 Cholesky (grows tenfold on "
        "failure).",
        1e-4,
    )
    layer_refit: bool = help_field(
        "After the grouped SVD, refit each layer's coefficients by least squares on that layer's "
        "own X^T X (the SVD whitens with the group's summed statistics). Never worse on each "
        "layer's calibration error; no extra data pass. An extension of the paper; no-op for "
        "groups of one.",
        False,
    )
    update_coefficients: bool = help_field(
        "After compressing, re-collect X^T X at the compressed model's inputs and refit every "
        "coefficient by least squares (the paper uses it at ratios >= 0.4).",
        False,
    )
    train_bases: bool = help_field("Whether the shared bases are trainable.", False)
    train_coefficients: bool = help_field("Whether the coefficients are trainable.", True)
    drop_dense_weights: bool = help_field(
        "Free the dense weights once compressed, so memory really falls (merge_and_unload "
        "rebuilds them from basis and coefficients).",
        True,
    )
    blocks: str | None = help_field(
        "Dotted path (or re: pattern) of the decoder-block ModuleList. None = found from the "
        "model's `_no_split_modules`.",
        None,
    )
    target_modules: list[str] | str | None = help_field(
        "Filled from the plan: the exact names of the compressed modules. Leave None.", None
    )
    layer_groups: dict[str, str] | None = help_field(
        "Filled from the plan: module name -> basis key. Leave None.", None
    )
    group_ranks: dict[str, int] | None = help_field(
        "Filled from the plan: basis key -> rank. Leave None.", None
    )
    modules_to_save: list[str] | None = help_field(
        "Modules apart from the compressed ones to train fully and save.", None
    )
    dynamic_rank_threshold: float = help_field(
        "Energy kept by dynamic rank at inference (hf_sparse.basis_sharing.dynamic_rank) when "
        "the call passes none: the share of sigma^2 (global_static) or of the prompt's output "
        "energy (prompt_adaptive) that the active directions must hold, in (0, 1].",
        0.95,
    )
    max_basis_rank: int | None = help_field(
        "Cap on every basis's active rank under dynamic rank (None: the full rank k). The "
        "factors are sliced to it, so compute falls with it.",
        None,
    )
    reorder_channels: bool = help_field(
        "Under dynamic rank, sort each layer's basis directions by their share of that layer's "
        "output energy (||C_j||^2 sigma_j^2, or the prompt's own for prompt_adaptive) before "
        "the cut, instead of the group's singular-value order; the kept ones are gathered.",
        False,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = BASIS_SHARING
        _check_ratio("ratio", self.ratio)
        if (
            not isinstance(self.group_size, int)
            or isinstance(self.group_size, bool)
            or self.group_size < 1
        ):
            raise ValueError(
                f"group_size must be a positive integer, got {self.group_size!r}; 1 = per-layer"
            )
        for field in ("target_roles", "shared_roles"):
            roles = getattr(self, field)
            if roles is None:
                continue
            if isinstance(roles, str):
                roles = [roles]
            bad = [r for r in roles if r not in ROLES]
            if bad:
                raise ValueError(f"{field} has unknown role(s) {bad}; valid roles: {list(ROLES)}")
            setattr(self, field, list(roles))
        if self.private_blocks is not None:
            blocks = self.private_blocks
            if isinstance(blocks, int) and not isinstance(blocks, bool):
                blocks = [blocks]
            if not isinstance(blocks, list | tuple | set) or any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in blocks
            ):
                raise ValueError(
                    f"private_blocks must be a list of block indices >= 0, got "
                    f"{self.private_blocks!r}; e.g. [0] keeps the first block private"
                )
            self.private_blocks = sorted(set(blocks))
        if self.role_ratios is not None:
            if not isinstance(self.role_ratios, dict):
                raise ValueError(f"role_ratios must map role -> ratio, got {self.role_ratios!r}")
            for role, value in self.role_ratios.items():
                if role not in ROLES:
                    raise ValueError(
                        f"role_ratios has unknown role {role!r}; valid roles: {list(ROLES)}"
                    )
                _check_ratio(f"role_ratios[{role!r}]", value)
        if (
            isinstance(self.damping, bool)
            or not isinstance(self.damping, int | float)
            or not math.isfinite(self.damping)
            or self.damping < 0
        ):
            raise ValueError(f"damping must be a finite number >= 0, got {self.damping!r}")
        threshold = self.dynamic_rank_threshold
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, int | float)
            or not 0 < threshold <= 1
        ):
            raise ValueError(
                f"dynamic_rank_threshold must be in (0, 1], got {threshold!r}; e.g. 0.95"
            )
        cap = self.max_basis_rank
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(
                f"max_basis_rank must be a positive integer or None (no cap), got {cap!r}"
            )
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)

    def ratio_of(self, role: str) -> float:
        return (self.role_ratios or {}).get(role, self.ratio)

    @property
    def is_planned(self) -> bool:
        return self.layer_groups is not None and self.group_ranks is not None


def _check_ratio(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ValueError(
            f"{field} must be in (0, 1) (the share of parameters removed), got {value!r}; "
            "e.g. 0.2 for 20%"
        )
