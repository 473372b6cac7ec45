"""2-D priors this package lends to others (entry point group ``fewstep.priors``)."""

from __future__ import annotations

from fewstep.core.priors import Prior2D


def digits(guidance_scale: float = 1.0, classifier_steps: int = 1500) -> Prior2D:
    """The cached class-conditional digits teacher (8x8 grey, labels 0-9, null label 10),
    with the digits classifier for judging what a render reads as."""
    from fewstep.image.classifier import load_classifier
    from fewstep.image.digits import null_labels
    from fewstep.image.recipes.digits import TeacherConfig
    from fewstep.image.teacher import guided, load_teacher

    teacher, info = load_teacher(TeacherConfig(), progress=False)
    classifier, _ = load_classifier(classifier_steps)
    denoiser = guided(teacher, guidance_scale) if guidance_scale != 1.0 else teacher
    return Prior2D(
        denoiser=denoiser,
        channels=1,
        size=8,
        num_classes=10,
        null_cond=null_labels,
        classify=classifier,
        info=dict(info),
    )
