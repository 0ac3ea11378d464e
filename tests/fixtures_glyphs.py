"""A small glyph set for tests and the notebooks' smoke run: Latin capitals drawn by the fonts matplotlib
ships (DejaVu, STIX, Computer Modern), in the CJK set's three class-disjoint parts, so that no CJK font
package is needed. It is a real glyph set (nbsrc.data.glyphs.build_glyphs): a config names it with
``data_root=<its .npz>``."""

from pathlib import Path

import matplotlib

from nbsrc.data.glyphs import FontFace, build_glyphs

TTF = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
FACES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
         "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
         "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
         "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
         "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf")
CHARS = "ABCDEFGHIJKLMNOPQRSTUVWX"  # 24 classes: pretrain A-H, train I-P (validation: O, P), test Q-X
PARTS = (("pretrain", 8), ("train", 8), ("test", 8))


def tiny_glyph_set(cache_dir: Path) -> Path:
    """Build (or find in ``cache_dir``) the small set; the path of its .npz."""
    fonts = tuple(FontFace("(matplotlib)", str(TTF / name)) for name in FACES)
    return build_glyphs(fonts, parts=PARTS, chars=list(CHARS), cache_dir=cache_dir, val_classes=2,
                        progress=False).path


def tiny_study_settings() -> dict:
    """nbsrc.paper.study's settings at their smallest, for a glyph set of these fonts: runs of 4 iterations, one or
    two seeds, a ViT as the 'convnet' (no download); the oblique and italic faces play the hand faces."""
    batches = {"batch_size": 16, "m_per_class": 4, "warmup_iters": 0, "eval_per_class": None, "log_every": 2}
    return dict(pretrain=["ce_print", "snca_print"], hand_faces=["DejaVuSans-Oblique.ttf", "DejaVuSerif-Italic.ttf"],
                max_iterations=4, eval_every=2, seeds_main=[0, 1], seeds_other=[0], poolings=["cls", "avg"],
                grid_iterations=3, pooling_candidates=[{"lr": 1e-4}, {"lr": 1e-3}],
                jobs=1, overrides=batches, claims=[f"C{i}" for i in range(1, 8)],
                pretrain_overrides={"iterations": 2, "warmup_iters": 0, "batch_size": 16, "m_per_class": 2},
                vit={"candidates": [{"lr": 1e-4}]},
                convnet={"backbone": "vit_tiny_patch16_224", "weights": "none", "patch_size": 8, "img_size": 32,
                         "max_iterations": 4, "candidates": [{"lr": 1e-4, "freeze_batchnorm": True}]})
