"""DToP: deep token pooling on a timm ViT (Song et al., "Boosting vision transformers for image
retrieval", WACV 2023). Reached through ``build_model(..., dtop=DToPConfig(...))`` (or ``dtop=True,
<option>=...``), i.e. a config whose ``model.dtop`` is set.

For an image, the ViT's last ``k`` encoder blocks (collected with forward hooks) give, per layer ``l``,
the [CLS] token ``c^l ∈ R^D`` and the patch tokens ``P^l ∈ R^{hw×D}``::

    global branch   c = [c^{L−k+1}; …; c^L] ∈ R^{kD}                                   (eq. 5)
    local branch    Y = fold_{h×w}( Σ_l softmax(a)_l P^l ) ∈ R^{D×h×w}                    (eq. 6)
                    U = ELM(Y)                                                      (eqs. 9–11)
                    ℓ = GeM( fusion(Y, U) )                                   (Table A13, A14–A20)
    output          f = FC([c; ℓ]) / ‖FC([c; ℓ])‖ ∈ R^N                                  (eq. 12)

The main paper's eqs. (5)–(12) are not in ``../shared/papers/``; the supplement names their parts
("the global branch (7) on multi-layer [CLS] features (5) or the local branch (10) on multi-layer
patch features (6)", "an FC layer with output feature dimension N", §A.2) and their size: "The
additional components of DToP have only 0.3M parameters" (§A.1). Our reading, where it leaves the
form open (each a row of ``docs/fidelity.md``):

* every collected layer output passes through the ViT's final LayerNorm (as the last one does);
* the k [CLS] tokens are concatenated;
* the k patch-token maps are mixed by k learned scalars, softmax-normalised (:class:`LayerMix`,
  initialised to the average over the k layers, k parameters), so that the ELM runs at the width
  of one layer and the added modules stay within the 0.3M of §A.1;
* the ELM's parts run in sequence, IRB then ASPP then WaveBlock (:mod:`nbsrc.models.locality`);
* the local branch is pooled by GeM with p = 3 (fixed) and tokens clamped at 1e-6
  (:class:`~nbsrc.models.pooling.TokenPooling`);
* one FC over the concatenation [c; ℓ] gives the N-dimensional output.

Without the final FC, the added modules of the full model (layer mix, ELM, orthogonal fusion, GeM)
have 218,118 parameters at D = 768, k = 6. The ELM is in :mod:`nbsrc.models.locality`, the position
encodings (DPE, eq. 2; none; CPE) in :mod:`nbsrc.models.position`. The ViT is built with timm's
``dynamic_img_size`` and ``dynamic_img_pad``, so an input of any size and aspect ratio works (sides
that are not a multiple of the patch size are zero-padded at the bottom and right).

Options (the fields of :class:`nbsrc.config.DToPConfig`, each defaulting to the paper's full model;
paper table in brackets):

    k           6             last encoder layers collected, 1..depth             (eqs. 5–6, A8)
    pos_embed   'dpe'         'dpe' | 'none' | 'cpe'                              (eq. 2, A9)
    pe_interp   'bilinear'    DPE interpolation: 'bilinear' | 'bicubic'           (eq. 2)
    elm         True          enhanced locality module on/off                     (eqs. 9–11, A10)
    elm_irb     True          inverted residual block                             (A10)
    elm_aspp    True          à trous spatial pyramid pooling                     (A10)
    elm_wave    True          WaveBlock                                           (A10)
    fusion      'orthogonal'  'none' | 'sum' | 'hadamard' | 'concat' | 'fast_norm' | 'orthogonal';
                              with elm=False the default is 'none' (Y alone)      (A13)
    head_dim    1536          output dimension N of the FC layer                  (eq. 12, A7)
    branch      'both'        'both' | 'global' ([CLS] only) | 'local' (patches only) (A5)

``pooling`` picks the local branch's pooling: 'gem' (p = 3, our reading; also what the default 'cls'
means here, since the [CLS] tokens form the global branch), 'avg' (Table A5's patch rows) or 'max'; 'dist' (a distilled
DeiT, timm ``deit_*_distilled_*``) forms the global branch from the distillation tokens instead, local
pooling gem. DToP §A.2 (Table A5): "we also evaluate multi-layer *distillation* features, replacing
[CLS] by the distillation token where it exists, i.e., [...] DeiT [28]". A distilled DeiT has
two prefix tokens, [CLS] then DIST, and its position embedding covers both: DPE keeps both entries
and resamples the grid part only.

Backbones: a token backbone (:mod:`nbsrc.models.tokens`: it reports its token grid and prefix tokens
and adds its own position encoding), made by :func:`nbsrc.models.backbones.create_backbone`: any timm
``VisionTransformer`` with a [CLS] token, including timm's hybrids (``vit_base_r50_s16_384``, DToP's
R50+ViT-B/16; ``vit_tiny_r_s16_p8_224``, ...), and nbsrc's own (``OWN_BACKBONES``), whose modules say
how they present their tokens and which k they allow.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from nbsrc.config import DToPConfig, ModelConfig
from nbsrc.errors import ConfigError
from nbsrc.models.backbones import create_backbone
from nbsrc.models.locality import EnhancedLocality, Fusion
from nbsrc.models.pooling import TokenPooling
from nbsrc.models.position import PositionGenerator
from nbsrc.models.retrieval import PCAReduction
from nbsrc.models.tokens import token_backbone

BRANCHES = ("both", "global", "local")
LOCAL_POOLINGS = {"cls": "gem", "dist": "gem", "gem": "gem", "avg": "avg", "max": "max"}
GLOBAL_TOKENS = ("cls", "dist")  # the prefix token of the global branch: [CLS] (eq. 5) or DIST (Table A5)


# ----------------------------------------------------------------------------- the model
class LayerMix(nn.Module):
    """Eq. (6), our reading: k patch-token maps [B, k, n, D] -> ``Σ_l softmax(a)_l P^l`` [B, n, D], with k
    learned scalars ``a`` (``weight``), initialised to 0, i.e. to the average over the k layers."""

    def __init__(self, k: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(k))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bknd,k->bnd", patches, self.weight.softmax(0))

    def extra_repr(self) -> str:
        return f"k={self.weight.numel()}"


class DToPModel(nn.Module):
    """images -> l2-normalised DToP embeddings [B, head_dim] (or [B, dim] once ``pca`` is fitted).

    Same interface as :class:`~nbsrc.models.RetrievalModel`: ``backbone`` (see :mod:`~nbsrc.models.tokens`),
    ``feature_dim`` (= ``head_dim``), ``output_dim``, ``pca``, ``forward_tokens``, ``forward_features``, ``forward``;
    :meth:`branches` returns the intermediate quantities of eqs. (5)–(12) for analysis.
    """

    def __init__(
        self,
        backbone: nn.Module,
        k: int = 6,
        pos_embed: str = "dpe",
        pe_interp: str = "bilinear",
        elm: bool = True,
        elm_irb: bool = True,
        elm_aspp: bool = True,
        elm_wave: bool = True,
        fusion: str | None = None,
        head_dim: int = 1536,
        branch: str = "both",
        local_pool: str = "gem",
        dim: int | None = None,
        gem_p: float = 3.0,
        gem_learnable: bool = False,
        global_token: str = "cls",
    ):
        super().__init__()
        backbone = token_backbone(backbone)  # timm's ViT in place, or one of nbsrc's own (nbsrc.models.tokens)
        if backbone.cls_token is None:
            raise ConfigError("DToP's global branch needs a [CLS] token; this ViT has none (class_token=False)")
        depth, d = len(backbone.blocks), backbone.num_features  # d: the width D (timm: a ViT's embed_dim)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= depth:
            raise ConfigError(
                f"k={k!r} is out of range: this backbone has {depth} encoder blocks"
                f"{getattr(backbone, 'blocks_note', '')}, use 1 <= k <= {depth}"
            )
        backbone.set_position(pos_embed, pe_interp)  # eq. 2, Table A9; what the backbone does not offer fails here
        if not getattr(backbone, "dynamic_img_size", False):
            raise ConfigError("DToP needs a ViT built with dynamic_img_size=True (build_dtop_model does this)")
        if branch not in BRANCHES:
            raise ConfigError(f"branch={branch!r} is unknown; use one of {', '.join(BRANCHES)} (Table A5: one branch)")
        if local_pool not in ("gem", "avg", "max"):
            raise ConfigError(f"local pooling {local_pool!r} is unknown; use gem, avg or max")
        if global_token not in GLOBAL_TOKENS:
            raise ConfigError(f"global_token={global_token!r} is unknown; use one of {', '.join(GLOBAL_TOKENS)}")
        if global_token == "dist" and getattr(backbone, "dist_token", None) is None:
            raise ConfigError("pooling='dist' needs a distilled DeiT (e.g. deit_base_distilled_patch16_224) for "
                              "DToP's global branch; use pooling='cls' for this backbone")
        fusion = fusion if fusion is not None else ("orthogonal" if elm else "none")

        self.backbone = backbone
        self.num_prefix = int(backbone.num_prefix_tokens)  # [CLS], DIST (distilled DeiT), registers
        self.global_index = GLOBAL_TOKENS.index(global_token)  # [CLS] is token 0, DIST token 1
        self.k, self.pos_embed_kind, self.pe_interp = k, pos_embed, pe_interp
        self.layer_ids = list(range(depth - k, depth))

        # Local branch: layer mix (eq. 6), ELM (eqs. 9–11), fusion (A14–A20), pooling.
        self.layer_mix = LayerMix(k)
        self.elm = EnhancedLocality(d, elm_irb, elm_aspp, elm_wave) if elm else None
        self.fusion = Fusion(fusion, elm=elm)
        self.local_pool = TokenPooling(local_pool, 0, False, gem_p, gem_learnable)

        # Output (eq. 12).
        self.global_dim, self.local_dim = k * d, self.fusion.out_dim(d)
        self.branch = branch  # Table A5: "only the global branch (7) ... or the local branch (10)"
        used = (self.global_dim if branch != "local" else 0) + (self.local_dim if branch != "global" else 0)
        self.head = nn.Linear(used, head_dim)
        self.feature_dim = head_dim
        self.pca = PCAReduction(head_dim, dim) if dim else None

        # Position encoding (eq. 2, Table A9): the backbone's position hook is replaced on this instance.
        self.peg = PositionGenerator(d) if pos_embed == "cpe" else None
        if pos_embed != "dpe" and backbone.pos_embed is not None:
            backbone.pos_embed.requires_grad_(False)  # kept for weight compatibility, never added
        backbone._pos_embed = self._pos_embed
        # Multi-layer features (eqs. 5–6): forward hooks on the last k blocks.
        self._layers: dict[nn.Module, torch.Tensor] | None = None  # a dict only while branches() runs
        self._hooks = []
        if self.peg is not None:  # registered first: the collected output of block 0 includes it
            self._hooks.append(backbone.blocks[0].register_forward_hook(self._apply_peg))
        for i in self.layer_ids:
            self._hooks.append(backbone.blocks[i].register_forward_hook(self._collect))

    # ------------------------------------------------------------------ backbone patches
    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's position hook: its embedded input with the position encoding of ``pos_embed``
        (the backbone's ``positions``, which records its token ``grid``)."""
        return self.backbone.positions(x)

    def _apply_peg(self, module, args, output: torch.Tensor) -> torch.Tensor:
        patches = self.peg(output[:, self.num_prefix :], self.backbone.grid)
        return torch.cat([output[:, : self.num_prefix], patches], dim=1)

    def _collect(self, module, args, output: torch.Tensor) -> None:
        if self._layers is not None:  # not when the backbone runs alone, nor in a checkpoint's recompute
            self._layers[module] = output

    # ------------------------------------------------------------------ forward
    @property
    def output_dim(self) -> int:
        """The size of the embedding :meth:`forward` returns: the PCA's ``dim`` once fitted, else ``head_dim``."""
        return self.pca.dim if self.pca is not None and bool(self.pca.fitted) else self.feature_dim

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's normalised tokens [B, prefix + h*w, D], as ``RetrievalModel``."""
        return self.backbone.forward_features(x)

    def branches(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything between the image and the output of eq. (12):

        ``cls`` [B, k, D] (the [CLS] tokens, or DIST with ``pooling='dist'``) and ``patches``
        [B, k, h*w, D] (normalised, per layer), ``Y`` and ``U``
        [B, D, h, w] (``U`` None without the ELM), ``global`` [B, kD] (eq. 5), ``local``
        [B, D or 2D] (pooled fusion), ``features`` [B, head_dim] (before l2).
        """
        self._layers = {}
        try:
            self.backbone.forward_features(x)
            layers = [self.backbone.norm(self._layers[self.backbone.blocks[i]]) for i in self.layer_ids]
        finally:
            self._layers = None
        h, w = self.backbone.grid
        cls = torch.stack([t[:, self.global_index] for t in layers], dim=1)  # [CLS] or DIST
        patches = torch.stack([t[:, self.num_prefix :] for t in layers], dim=1)
        b, k, _, d = patches.shape
        y_tokens = self.layer_mix(patches)  # eq. (6)
        y = y_tokens.transpose(1, 2).reshape(b, d, h, w)
        u = self.elm(y) if self.elm is not None else None
        u_tokens = u.flatten(2).transpose(1, 2) if u is not None else None
        local = self.local_pool(self.fusion(y_tokens, u_tokens))
        glob = cls.reshape(b, k * d)  # eq. (5)
        parts = {"both": [glob, local], "global": [glob], "local": [local]}[self.branch]
        feats = self.head(torch.cat(parts, dim=1))  # eq. (12), before l2 (Table A5: one branch)
        return {"cls": cls, "patches": patches, "Y": y, "U": u, "global": glob, "local": local, "features": feats}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.branches(x)["features"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.forward_features(x), dim=-1)
        if self.pca is not None and bool(self.pca.fitted):
            z = F.normalize(self.pca(z), dim=-1)
        return z

    def extra_repr(self) -> str:
        return (f"k={self.k}, pos_embed={self.pos_embed_kind}, pe_interp={self.pe_interp}, "
                f"head_dim={self.feature_dim}, "
                f"global_token={GLOBAL_TOKENS[self.global_index]}")


# ----------------------------------------------------------------------------- builder
def build_dtop_model(model: ModelConfig, weights: str, img_size: int | None) -> DToPModel:
    """The DToP model of the config's ``model`` section (:data:`nbsrc.models.MODEL_KINDS`' ``dtop``):
    ``model.dtop``'s options (:class:`~nbsrc.config.DToPConfig`, the paper's full model by default) on
    ``model.backbone``; ``model.pooling`` picks the local branch's pooling. ``weights`` is resolved by
    :func:`nbsrc.models.build_from_section`: 'none', 'timm' (timm's hub) or 'efficientnet_lite0' (only
    for ``effnet_lite0_vit``); a path is loaded there after the build. ``model.dtop`` was validated with its
    section (:meth:`~nbsrc.config.DToPConfig.validate`); the checks that depend on the backbone are
    :class:`DToPModel`'s."""
    dtop = model.dtop if model.dtop is not None else DToPConfig()
    if model.pooling not in LOCAL_POOLINGS:
        raise ConfigError(
            f"pooling={model.pooling!r} does not apply to DToP: its local branch pools with gem (default), avg or max; "
            "'dist' takes a distilled DeiT's distillation tokens for the global branch"
        )
    try:
        net = create_backbone(model.backbone, weights, img_size, model.patch_size, dynamic=True)
    except TypeError as e:
        if "dynamic_img" in str(e):
            raise ConfigError(f"DToP needs a timm VisionTransformer; {model.backbone!r} is not one") from None
        raise
    return DToPModel(net, local_pool=LOCAL_POOLINGS[model.pooling], dim=model.dim, gem_p=model.gem_p,
                     gem_learnable=model.gem_learnable, global_token="dist" if model.pooling == "dist" else "cls",
                     **dataclasses.asdict(dtop))
