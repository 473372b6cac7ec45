"""Diagnose whether the cached default video teacher uses its class label: x0-prediction error
on noised real clips with the right, a wrong and the null label (and how far apart the right-
and wrong-label predictions are), the classifier's accuracy of those predictions, and of
30-step samples at several CFG scales.

    uv run --package fewstep-video python benchmarks/video_teacher_cond.py

Session 9 (default teacher: patch (1, 4, 4), 3,000 steps): at t = 0.9 the three labels give
x0-MSE 0.1094 / 0.1098 / 0.1098 and the right- and wrong-label predictions differ by 0.0006
(mean square), i.e. the label is nearly ignored; sample accuracy 0.20-0.25 at CFG 1, 3 and 7
(real clips 0.50).
"""

from __future__ import annotations

import torch

from fewstep.core.models import GuidedDenoiser
from fewstep.core.samplers import EulerSampler
from fewstep.video.evaluate import class_accuracy, load_classifier
from fewstep.video.teacher import VideoTeacherConfig, load_clips, load_teacher, null_labels


def main() -> None:
    torch.set_num_threads(1)
    cfg = VideoTeacherConfig()
    teacher, _ = load_teacher(cfg, progress=False)
    clips, labels = load_clips(cfg.data)
    clf, _ = load_classifier()
    x0, lab = clips[:64], labels[:64]
    wrong = (lab + 5) % 10
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in (0.3, 0.6, 0.9):
            tt = torch.full((len(x0),), t)
            xt = teacher.path.noise(x0, tt, torch.randn(x0.shape, generator=gen))

            def x0_hat(lb, xt=xt, tt=tt):
                out = teacher(xt, tt, lb)
                return teacher.path.to_x0_eps(out, teacher.prediction, xt, tt)[0]

            right, other, null = x0_hat(lab), x0_hat(wrong), x0_hat(null_labels(lab))
            mse = [(p - x0).pow(2).mean().item() for p in (right, other, null)]
            print(
                f"t={t}: x0-MSE right {mse[0]:.4f} wrong {mse[1]:.4f} null {mse[2]:.4f}; "
                f"right vs wrong {(right - other).pow(2).mean():.5f}; accuracy of x0-hat: "
                f"right {class_accuracy(clf, right, lab):.2f}, wrong label as target "
                f"{class_accuracy(clf, other, wrong):.2f}"
            )
        n = 40
        lb = torch.arange(n) % 10
        noise = torch.randn((n, *clips.shape[1:]), generator=torch.Generator().manual_seed(2))
        for scale in (1.0, 3.0, 7.0):
            den = teacher if scale == 1.0 else GuidedDenoiser(teacher, scale, null_labels)
            out = EulerSampler(30).sample(den, noise, lb).x.clamp(-1, 1)
            print(f"CFG {scale}: sample digit accuracy {class_accuracy(clf, out, lb):.3f}")
    print(f"real clips: {class_accuracy(clf, clips[:200], labels[:200]):.3f}")


if __name__ == "__main__":
    main()
