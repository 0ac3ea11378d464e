"""Every preset against a table written here from the papers (IRT §4.2 and Tables 2-9; DToP §A.1,
§A.2 and Tables A5, A7-A13), so that a preset cannot drift from its paper.

Each preset's expected settings are two dicts: ``PAPER`` (what a paper states, or what follows from its
tables) and ``READING`` (our choice where it is silent, each with a one-line reason), so that a reading can
change without the test claiming that the paper changed. Together they cover every field of the preset's
family (``FIELDS``): the settings shared by all (dataset, backbone, image size, descriptor size, loss,
margin, λ, optimizer, lr, weight decay, batch, iterations, memory, momentum, pooling), plus for IRT on
SfM-120k the tuples per batch, negatives per tuple, pairs per epoch, negative pool, GeM exponent, tuple
loss, epoch decay and schedule, for IRT's category level the schedule and sampler, and for DToP k, N,
branch, ELM parts, fusion, position embedding, warm-up, schedule and its final factor, scales, whitening,
sampler and augmentation.
"""

import math

import pytest
import torch

from nbsrc.paper.reproduce import preset_grid
from nbsrc.presets import list_presets, load_preset, preset_grid_tables, preset_paper

COMMON = ("dataset", "backbone", "img_size", "dim", "loss", "margin", "lam", "optimizer", "lr", "weight_decay",
          "batch_size", "iterations", "memory_size", "momentum", "pooling")
FIELDS = {
    "cat": COMMON + ("scheduler", "warmup_iters", "sampler", "m_per_class"),
    "sfm": tuple(f for f in COMMON if f != "batch_size") + (
        "tuples_per_batch", "negatives_per_tuple", "pairs_per_epoch", "negative_pool", "gem_p", "tuple_loss",
        "lr_decay_per_epoch", "scheduler", "warmup_iters"),
    "dtop": COMMON + ("k", "head_dim", "branch", "elm", "fusion", "pos_embed", "pe_interp", "warmup_iters",
                      "scheduler", "min_lr_factor", "eval_scales", "whitening", "sampler", "m_per_class", "gem_p",
                      "arcface_scale", "dtop_augmentation", "sfm_training"),
}


def family(name: str) -> str:
    return "dtop" if name.startswith("dtop_") else "sfm" if "_sfm_" in name else "cat"


def settings(cfg) -> dict:
    """Every field the drift test reads from a preset's config (flat)."""
    m, o, loss, e, d, t = cfg.model, cfg.optim, cfg.loss, cfg.eval, cfg.data, cfg.tuples
    dt = m.dtop
    return {
        "dataset": d.dataset, "backbone": m.backbone, "img_size": d.img_size, "dim": m.dim, "loss": loss.name,
        "margin": loss.arcface_margin if loss.name == "arcface" else loss.beta, "lam": loss.lam,
        "optimizer": o.optimizer, "lr": o.lr, "weight_decay": o.weight_decay, "batch_size": o.batch_size,
        "iterations": o.iterations, "memory_size": loss.memory_size, "momentum": loss.momentum, "pooling": m.pooling,
        "scheduler": o.scheduler, "warmup_iters": o.warmup_iters, "min_lr_factor": o.min_lr_factor,
        "sampler": d.sampler, "m_per_class": o.m_per_class, "gem_p": m.gem_p, "tuple_loss": loss.tuple_loss,
        "lr_decay_per_epoch": o.lr_decay_per_epoch, "arcface_scale": loss.arcface_scale,
        "eval_scales": e.eval_scales, "whitening": e.whitening, "dtop_augmentation": d.dtop_augmentation,
        "sfm_training": d.sfm_training,
        "tuples_per_batch": t and t.tuples_per_batch, "negatives_per_tuple": t and t.negatives_per_tuple,
        "pairs_per_epoch": t and t.pairs_per_epoch, "negative_pool": t and t.negative_pool,
        "k": dt and dt.k, "head_dim": dt and dt.head_dim, "branch": dt and dt.branch,
        "elm": dt and tuple(part for part in ("irb", "aspp", "wave") if dt.elm and getattr(dt, f"elm_{part}")),
        "fusion": dt and dt.effective_fusion, "pos_embed": dt and dt.pos_embed, "pe_interp": dt and dt.pe_interp,
    }


# IRT §4.2, category level: "AdamW ... learning rate 3·10⁻⁵, weight decay 5·10⁻⁴ and batch size of 64 ...
# β = 0.5 ... λ = 0.7"; "SOP and In-Shop models were trained for 35k iterations and the CUB-200-2011 model
# ... for 2000 iterations"; "a dynamic offline memory queue of the same size as the dataset (with the
# exception of In-Shop dataset for which the memory size is 0.2 of the dataset size)"; "for the In-Shop
# dataset we adopt a momentum encoder ... 0.999"; "resizing the image to 256×256 and then taking a random
# crop of size 224×224"; §3.2: "view this class embedding as a global image descriptor".
TRAIN_IMAGES = {"sop": 59_551, "cub": 5_864, "inshop": 25_882}  # the official training splits (IRT §4.1)
CAT = {"optimizer": "adamw", "lr": 3e-5, "weight_decay": 5e-4, "batch_size": 64, "img_size": 224}
CAT_ITERS = {"sop": 35_000, "cub": 2_000, "inshop": 35_000}
CAT_MEMORY = {"sop": TRAIN_IMAGES["sop"], "cub": TRAIN_IMAGES["cub"], "inshop": round(0.2 * TRAIN_IMAGES["inshop"])}
CAT_READING = {"scheduler": ("constant", "no schedule stated (fidelity row 21)"),
               "warmup_iters": (0, "no warm-up stated (row 21)"),
               "sampler": ("m_per_class", "not stated; a batch needs positives (row 23)")}
# IRT §4.2, particular objects: "Adam ... 5·10⁻⁷ and weight decay of 10⁻⁶. The contrastive loss margin is
# set to β = 0.85. The models are finetuned for 100 epochs"; "each batch consists of 5 tuples of (1 anchor,
# 1 positive, 5 negatives)"; "For each epoch, we randomly select 2,000 positive pairs and 22,000 negative
# candidates"; "All models with GeM pooling use a pooling exponent value of p = 3".
SFM = {"optimizer": "adam", "lr": 5e-7, "weight_decay": 1e-6, "memory_size": 0, "momentum": None,
       "iterations": 100 * math.ceil(2000 / 5), "tuples_per_batch": 5, "negatives_per_tuple": 5,
       "pairs_per_epoch": 2000, "negative_pool": 22_000, "gem_p": 3.0, "dataset": "sfm120k",
       "loss": "contrastive", "margin": 0.85}
SFM_READING = {"tuple_loss": ("distance", "cirtorch's loss, 'the default hyper-parameters of Radenović' (row 36)"),
               "lr_decay_per_epoch": (0.01, "cirtorch's exp(-0.01) per epoch, not stated in words (row 37)"),
               "scheduler": ("constant", "no schedule stated beyond cirtorch's epoch decay (row 37)"),
               "warmup_iters": (0, "no warm-up stated: nothing added (row 39)")}
# DToP §A.1: "batch size of 64 and the ArcFace loss with margin 0.15 ... stochastic gradient descent with
# momentum 0.9, initial learning rate 10⁻³ and cosine learning rate decay"; "fine-tune them on SfM-120k";
# "We apply random cropping, illumination and scaling augmentation"; Tables A8 (k = 6), A9 (DPE bi-linear),
# A10 (IRB, ASPP, WB), A7 (N = 1,536, supervised whitening), A11 (3 scales on both sides, following [52]:
# 1, 1/√2, 1/2), A12 (group-size sampling), A13 ("We choose orthogonal fusion as default").
DTOP = {"dataset": "sfm120k", "optimizer": "sgd", "lr": 1e-3, "batch_size": 64, "loss": "arcface", "margin": 0.15,
        "lam": 0.0, "memory_size": 0, "momentum": None, "dim": None, "scheduler": "cosine", "pos_embed": "dpe",
        "pe_interp": "bilinear", "eval_scales": [1.0, 1 / math.sqrt(2), 0.5], "whitening": "learned",
        "sampler": "group_size", "dtop_augmentation": True}
DTOP_READING = {
    "img_size": (384, "the longer side of the group-size batches: Table A12's fixed size (row 63)"),
    "weight_decay": (1e-4, "not stated (row 59)"),
    "iterations": (30_000, "the length is not stated (row 62)"),
    "arcface_scale": (30.0, "not stated (row 56)"),
    "m_per_class": (2, "images per 3D model in a batch, not stated (row 63)"),
    "min_lr_factor": (1e-4, "'decay factor 10⁻⁴' read as the final lr over the initial (row 60)"),
    "gem_p": (3.0, "the local branch's GeM exponent, not in the supplement (row 92)"),
    "sfm_training": ("classes", "ArcFace classes = SfM-120k's 3D models (row 57)"),
}
ELM_ALL = ("irb", "aspp", "wave")

DS, DT, DB, DB384 = ("deit_small_patch16_224", "deit_small_distilled_patch16_224",
                     "deit_base_distilled_patch16_224", "deit_base_distilled_patch16_384")
R50, R101 = "resnet50.tv_in1k", "resnet101.tv_in1k"  # Table 1: ImageNet-1k R50 76.2, R101 77.4 top-1
PITB = "pit_b_distilled_224"  # DToP Table A5's PiT-B (ImageNet-1k) with the DIST line: the distilled one
CHECKPOINT = {R50: "torchvision's ImageNet-1k R50 as Table 1's (row 1)", R101: "torchvision's R101 (row 1)",
              "vit_base_r50_s16_384": "timm's R50+ViT-B/16, in21k then 384 px (row 50)",
              "vit_base_patch16_384": "timm's ViT-B/16 at 384 px; the supplement names no checkpoint (row 72)",
              DB384: "timm's distilled DeiT-B at 384 px for Table A5's DeiT-B (row 70)",
              PITB: "timm's distilled PiT-B for Table A5's PiT-B rows (row 70)"}


def backbone(name: str) -> tuple[dict, dict]:
    """A backbone the paper names by its model (PAPER) or whose checkpoint is our choice (READING)."""
    return ({}, {"backbone": (name, CHECKPOINT[name])}) if name in CHECKPOINT else ({"backbone": name}, {})


def cat(ds, net=DS, dim=None, lam=0.7, loss="contrastive", trained=True):
    paper, reading = backbone(net)
    paper.update(CAT, dataset=ds, dim=dim, loss=loss, margin=0.5, lam=lam,
                 iterations=CAT_ITERS[ds] if trained else 0,
                 memory_size=0 if loss == "nsoftmax" else CAT_MEMORY[ds],
                 momentum=0.999 if ds == "inshop" and loss != "nsoftmax" else None)
    if net == R50:
        reading["pooling"] = ("avg", "Table 4's R50 (2048-d): global average pooling (row 27)")
    else:
        paper["pooling"] = "cls"
    reading.update(CAT_READING, m_per_class=(4 if ds == "cub" else 2, "images per class in a batch (row 23)"))
    return paper, reading


def sfm(net=DS, img=224, dim=None, lam=0.0, trained=True, pooling="cls", img_reading=None, lam_reading=None):
    paper, reading = backbone(net)
    paper.update(SFM, dim=dim, pooling=pooling, iterations=SFM["iterations"] if trained else 0)
    if img_reading:
        reading["img_size"] = (img, img_reading)
    else:
        paper["img_size"] = img
    if lam_reading:
        reading["lam"] = (lam, lam_reading)
    else:
        paper["lam"] = lam
    reading.update(SFM_READING)
    return paper, reading


TABLE_369_SIZE = "Tables 3, 6, 9 print no image size for DeiT-S (row 44)"
TABLE8_LAM = "Table 8 prints no λ for IRT_R DeiT-B†: λ = 4 as for DeiT-S (row 43)"


def dtop(net, a5=None):
    """The full model (``a5=None``) or a Table A5 row: 'cls', 'dist' (global branch), 'patch' (local branch)."""
    paper, reading = backbone(net)
    paper.update(DTOP)
    reading.update(DTOP_READING)
    pit = net == PITB
    if a5 is None:  # Tables A7-A13 (A10 without the CNN stem)
        paper.update(k=6, head_dim=1536, branch="both", elm=ELM_ALL, fusion="orthogonal")
        reading["pooling"] = ("cls", "[CLS] global; GeM local, the main paper's pooling not in papers/ (row 92)")
        reading["warmup_iters"] = (3 * math.ceil(91_642 / 64), "'3 epochs' on SfM-120k, epoch = 91,642 / 64 (row 61)")
    else:  # §A.2: "only the global branch (7) ... or the local branch (10) ... Y' = Y ... N = 768 ... without warm-up"
        paper.update(head_dim=768, branch="local" if a5 == "patch" else "global", elm=(), fusion="none",
                     warmup_iters=0, pooling={"cls": "cls", "dist": "dist", "patch": "avg"}[a5])
        reading["k"] = (4, "PiT-B's last stage (row 70)") if pit else (6, "Table A5 states no k (row 69)")
    return paper, reading


ROWS = {
    # IRT Table 3 (DeiT-S, 384-d): IRT_O, IRT_L, IRT_R; IRT Table 2: IRT_R DeiT-S ▷128, 384, DeiT-S† 384
    **{f"irt_o_{d}_deits": cat(d, lam=0.0, trained=False) for d in TRAIN_IMAGES},
    **{f"irt_l_{d}_deits": cat(d, lam=0.0) for d in TRAIN_IMAGES},
    **{f"irt_r_{d}_deits": cat(d) for d in TRAIN_IMAGES},
    **{f"irt_r_{d}_deits_128": cat(d, dim=128) for d in TRAIN_IMAGES},
    **{f"irt_r_{d}_deits_dist": cat(d, net=DT) for d in TRAIN_IMAGES},
    # IRT Table 4 (SOP, β = 0.5; IRT_L): NSoftmax, SNCA, contrastive for R50 (2048-d) and DeiT-S (384-d)
    "irt_l_sop_deits_nsoftmax": cat("sop", lam=0.0, loss="nsoftmax"),
    "irt_l_sop_deits_snca": cat("sop", lam=0.0, loss="snca"),
    "irt_l_sop_r50": cat("sop", net=R50, lam=0.0),
    "irt_l_sop_r50_nsoftmax": cat("sop", net=R50, lam=0.0, loss="nsoftmax"),
    "irt_l_sop_r50_snca": cat("sop", net=R50, lam=0.0, loss="snca"),
    # IRT Tables 3, 6, 9 (DeiT-S, 384-d); IRT_R on SfM-120k: λ = 4 (Table 3's row is Table 6's λ = 4.0 row)
    "irt_o_sfm_deits": sfm(trained=False, img_reading=TABLE_369_SIZE),
    "irt_l_sfm_deits": sfm(img_reading=TABLE_369_SIZE),
    "irt_r_sfm_deits": sfm(lam=4.0, img_reading=TABLE_369_SIZE),
    # IRT Table 7 (IRT_L): 224 px ▷128 and full; 384 px ▷128 and full
    "irt_l_sfm_deits_dist_128": sfm(DT, dim=128), "irt_l_sfm_deits_dist": sfm(DT),
    "irt_l_sfm_deitb_dist_128": sfm(DB, dim=128), "irt_l_sfm_deitb_dist": sfm(DB),
    "irt_l_sfm_deitb_dist384_128": sfm(DB384, 384, 128), "irt_l_sfm_deitb_dist384": sfm(DB384, 384),
    # ... and its convnet rows, "GeM" and "R-MAC" poolers
    **{f"irt_l_sfm_{net}_{pool}{suffix}": sfm(backbone, img, dim, pooling=pool)
       for pool in ("gem", "rmac")
       for net, backbone, img, suffix, dim in [("r50", R50, 224, "_128", 128), ("r50", R50, 224, "", None),
                                               ("r101", R101, 224, "_128", 128), ("r101", R101, 224, "", None),
                                               ("r101", R101, 384, "384_128", 128), ("r101", R101, 384, "384", None)]},
    # IRT Table 8: IRT_R DeiT-B† {384}, ▷128 and 768-d
    "irt_r_sfm_deitb_dist384_128": sfm(DB384, 384, 128, lam=4.0, lam_reading=TABLE8_LAM),
    "irt_r_sfm_deitb_dist384": sfm(DB384, 384, lam=4.0, lam_reading=TABLE8_LAM),
    # DToP Tables A7-A13 (the full model), A10 (no CNN stem), A5 (backbones, one branch, no ELM)
    "dtop_full_r50vitb16_sfm": dtop("vit_base_r50_s16_384"), "dtop_full_vitb16_sfm": dtop("vit_base_patch16_384"),
    "dtop_a5_vitb16_cls_sfm": dtop("vit_base_patch16_384", "cls"),
    "dtop_a5_vitb16_patch_sfm": dtop("vit_base_patch16_384", "patch"),
    "dtop_a5_r50vitb16_cls_sfm": dtop("vit_base_r50_s16_384", "cls"),
    "dtop_a5_r50vitb16_patch_sfm": dtop("vit_base_r50_s16_384", "patch"),
    "dtop_a5_deitb_cls_sfm": dtop(DB384, "cls"), "dtop_a5_deitb_dist_sfm": dtop(DB384, "dist"),
    "dtop_a5_deitb_patch_sfm": dtop(DB384, "patch"),
    "dtop_a5_pitb_cls_sfm": dtop(PITB, "cls"), "dtop_a5_pitb_dist_sfm": dtop(PITB, "dist"),
    "dtop_a5_pitb_patch_sfm": dtop(PITB, "patch"),
}
PAPER = {name: paper for name, (paper, _) in ROWS.items()}
READING = {name: reading for name, (_, reading) in ROWS.items()}


def test_every_preset_is_in_the_table():
    assert sorted(ROWS) == list_presets()


@pytest.mark.parametrize("name", sorted(ROWS))
def test_the_table_covers_every_field_once_and_gives_each_reading_a_reason(name):
    paper, reading = PAPER[name], READING[name]
    assert not set(paper) & set(reading), set(paper) & set(reading)
    assert sorted({*paper, *reading}) == sorted(FIELDS[family(name)])
    assert all(isinstance(why, str) and why for _, why in reading.values())


@pytest.mark.parametrize("name", sorted(ROWS))
def test_preset_settings_are_the_papers_and_our_readings(name):
    got = settings(load_preset(name))
    got = {k: got[k] for k in FIELDS[family(name)]}
    assert {k: got[k] for k in PAPER[name]} == PAPER[name], "the paper's settings"
    assert {k: got[k] for k in READING[name]} == {k: v for k, (v, _) in READING[name].items()}, "our readings"


# ----------------------------------------------------------------------------- the numbers
def results(name):
    return preset_paper(name)["results"]


def test_irt_tables_agree_where_they_share_a_row():
    """Facts that follow from comparing the tables (papers/README.md)."""
    lam = preset_grid("irt_r_sfm_deits", "6")
    assert lam["λ = 0"]["paper"] == results("irt_l_sfm_deits")  # Table 3's IRT_L = Table 6's λ = 0
    assert lam["λ = 4"]["paper"] == results("irt_r_sfm_deits")  # Table 3's IRT_R = Table 6's λ = 4.0
    assert lam["λ = 4"]["config"].loss.lam == 4.0 == load_preset("irt_r_sfm_deits").loss.lam
    pool = preset_grid("irt_l_sfm_deits", "9")
    assert pool["cls"]["paper"] == results("irt_l_sfm_deits")  # Table 9 is IRT_L
    assert results("irt_l_sfm_deitb_dist384") == {"roxford5k": {"mAP M": 50.5, "mAP H": 22.7},
                                                   "rparis6k": {"mAP M": 70.6, "mAP H": 47.4}}  # Tables 7 and 8
    # Table 7's last R-MAC row
    assert results("irt_l_sfm_r101_rmac384") == {"roxford5k": {"mAP M": 37.1, "mAP H": 10.6},
                                                  "rparis6k": {"mAP M": 66.0, "mAP H": 41.4}}
    assert preset_grid("irt_l_sop_deits", "9")["cls"]["paper"]["sop"]["R@1"] == results("irt_l_sop_deits")["sop"]["R@1"]
    assert results("irt_r_sop_deits")["sop"]["R@1"] == 84.0  # Table 2's DeiT-S 384 row is Table 3's IRT_R


def test_the_in_shop_distilled_row_as_printed():
    assert results("irt_r_inshop_deits_dist") == {"inshop": {"R@1": 91.9, "R@10": 98.1, "R@20": 98.7, "R@30": 98.9}}


def test_dtop_full_row_is_in_every_ablation_table():
    full = results("dtop_full_r50vitb16_sfm")
    assert full["roxford5k"] == {"mAP M": 68.5, "mAP H": 43.0} and full["oxford5k"] == {"mAP": 89.7}
    for table in ("A7", "A8", "A9", "A10", "A11", "A12", "A13"):
        grid = preset_grid("dtop_full_r50vitb16_sfm", table)
        same = [label for label, row in grid.items() if row["paper"] == full]
        assert len(same) == 1, (table, same)
        assert grid[same[0]]["config"].run.name == "dtop_full_r50vitb16_sfm"  # the full model's own run, trained once


def test_grids_change_only_what_their_table_varies():
    base = load_preset("dtop_full_r50vitb16_sfm").fingerprint()
    for table in preset_grid_tables("dtop_full_r50vitb16_sfm"):
        for label, row in preset_grid("dtop_full_r50vitb16_sfm", table).items():
            diff = {k for k, v in row["config"].fingerprint().items() if v != base[k]}
            assert diff <= {"name", "model_options", "sampler"}, (table, label, diff)
    a12 = preset_grid("dtop_full_r50vitb16_sfm", "A12")
    assert a12["fixed-size (384x384)"]["config"].data.sampler == "m_per_class"
    a11 = preset_grid("dtop_full_r50vitb16_sfm", "A11")
    assert a11["query multi, database single"]["database_scales"] == [1.0]
    t5 = preset_grid("irt_r_sop_deits", "5")
    assert len(t5) == 25 and t5["β = 0.9, λ = 1"]["paper"] == {"sop": {"R@1": 41.5}}
    assert t5["β = 0.9, λ = 1"]["config"].loss.beta == 0.9 and t5["β = 0.9, λ = 1"]["config"].loss.lam == 1.0
    assert preset_grid("irt_l_sop_r50", "5")["β = 0.5, λ = 0"]["paper"]["sop"]["R@1"] == 79.8  # Table 4's R50 row


def test_dtop_a5_deit_b_rows_as_read_from_the_damaged_table():
    """papers/README.md: DeiT-B CLS 82.3 / 84.1 / 59.6 / 67.6 / 29.1 / 46.5, DIST 84.2 / 85.5 / 62.4 / 71.2 /
    32.6 / 49.7 (Oxf5k, Par6k, ROxf M, RPar M, ROxf H, RPar H); the DIST row takes the distillation token. The
    patch row (average-pooled, Table A5) is illegible: its preset records no number."""
    rows = [("dtop_a5_deitb_cls_sfm", "cls", (82.3, 84.1, 59.6, 67.6, 29.1, 46.5)),
            ("dtop_a5_deitb_dist_sfm", "dist", (84.2, 85.5, 62.4, 71.2, 32.6, 49.7)),
            ("dtop_a5_deitb_patch_sfm", "avg", (None,) * 6)]
    for name, pooling, (o, p, om, pm, oh, ph) in rows:
        assert results(name) == {"oxford5k": {"mAP": o}, "paris6k": {"mAP": p}, "roxford5k": {"mAP M": om, "mAP H": oh},
                                 "rparis6k": {"mAP M": pm, "mAP H": ph}}
        assert load_preset(name).model.pooling == pooling


def test_dtop_a5_pit_b_rows_as_printed():
    """Table A5's PiT-B row: CLS 69.0 / 77.0 / 43.6 / 59.1 / 19.8 / 28.7 and patch 70.9 / 81.2 / 42.4 / 64.8 /
    18.9 / 35.5 (Oxf5k, Par6k, ROxf M, RPar M, ROxf H, RPar H); its DIST line is not legible (papers/README.md),
    so that preset records no number. k = 4, PiT-B's last stage (our reading, nbsrc.models.pit)."""
    for name, pooling, branch, numbers in [
            ("dtop_a5_pitb_cls_sfm", "cls", "global", (69.0, 77.0, 43.6, 59.1, 19.8, 28.7)),
            ("dtop_a5_pitb_patch_sfm", "avg", "local", (70.9, 81.2, 42.4, 64.8, 18.9, 35.5)),
            ("dtop_a5_pitb_dist_sfm", "dist", "global", (None,) * 6)]:
        o, p, om, pm, oh, ph = numbers
        assert results(name) == {"oxford5k": {"mAP": o}, "paris6k": {"mAP": p}, "roxford5k": {"mAP M": om, "mAP H": oh},
                                 "rparis6k": {"mAP M": pm, "mAP H": ph}}
        cfg = load_preset(name)
        assert (cfg.model.pooling, cfg.model.dtop.branch, cfg.model.dtop.k) == (pooling, branch, 4)
        assert cfg.model.dtop.elm is False and cfg.model.dtop.head_dim == 768 and cfg.optim.warmup_iters == 0
        assert "our reading" in preset_paper(name)["notes"].lower() and "k = 4" in preset_paper(name)["notes"]


def test_grid_errors():
    from nbsrc.errors import ConfigError

    with pytest.raises(ConfigError, match="records no grid for table '5'; it records 9"):
        preset_grid("irt_l_sop_deits", "5")


def test_dtop_branch_option():
    """Table A5: the global branch alone ([CLS] of k layers -> FC) or the local branch alone."""
    from nbsrc.errors import ConfigError
    from nbsrc.models import build_model

    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, dtop=True, k=2, elm=False, head_dim=16)
    g = build_model("vit_tiny_patch16_224", branch="global", **kw).eval()
    loc = build_model("vit_tiny_patch16_224", pooling="avg", branch="local", **kw).eval()
    assert g.head.in_features == 2 * 192 and loc.head.in_features == 192
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        b = g.branches(x)
        assert torch.allclose(b["features"], g.head(b["global"]), atol=1e-6)
        b = loc.branches(x)
        assert torch.allclose(b["features"], loc.head(b["local"]), atol=1e-6)
        assert torch.allclose(b["local"], b["Y"].flatten(2).mean(-1), atol=1e-5)  # "global average pooling"
    with pytest.raises(ConfigError, match="branch='cls' is unknown"):
        build_model("vit_tiny_patch16_224", branch="cls", **kw)
