"""The options a method is built with: the RRM matching and its attack (`RRMOptions`, which the robust distillation
methods' attack reads too) and ARD's own (`RobustDistillOptions`); each option's type, choices and bounds are
`rrm_hub.settings.check`'s, the rules across them `RRMOptions.check`'s."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

from ..attacks import Attack, Noise, fgsm, nfgsm, pgd
from ..errors import RRMError
from ..settings import setting
from .memory import CARRIED_STEP

NOT_WITH_NFGSM = ("--match-attack n-fgsm starts from fresh noise at every step; add --match-start random (or use "
                  "--match-attack fgsm)")
FREE_NEEDS_MEMORY = ("--match-attack free moves each image's perturbation for the next epoch: it needs --match-start "
                     "previous")
CLEAN_ONLY = ("--cache-teacher holds the teacher's outputs on clean images only, but --match-on {match_on} with "
              "--teacher-input matched shows it perturbed ones; use --match-on clean or --teacher-input clean, "
              "or drop --cache-teacher")
NOT_CACHED = ("--cache-teacher holds the teacher's outputs on clean images: it serves --method rrm, ard and rslad, "
              "not {method} (drop --cache-teacher)")
@dataclass
class RRMOptions:
    """The options of the `rrm_hub.RRM` objective (its keyword arguments); defaults are the paper's."""

    TITLE: ClassVar[str] = "RRM loss"
    ce_weight: float | None = setting(None, "weight of cross-entropy on the images matched on (default: 1 for "
                                      "--match-on adversarial, 0.005 as in the reference code otherwise)")
    feature_weight: float = setting(1.0, "weight of the feature mismatch")
    feature_loss: Literal["cosine", "l2"] = setting("cosine", "mismatch of two representations: 1 - cos, or mean "
                                                    "squared error")
    match_on: Literal["clean", "noise", "adversarial", "mixup", "cutmix", "shift"] = setting(
        "clean", "adversarial: student inputs moved by --match-steps signed-gradient steps (--match-attack, "
        "--match-attack-loss), one more student forward/backward per step; clean: the paper's method; noise: "
        "inputs plus random noise (--noise) in the eps-ball; mixup / cutmix: mixes of two training images "
        "(--mix-alpha); shift: views shifted by up to --match-shift pixels; noise, mixup, cutmix and shift cost "
        "what clean does (add --clean-weight 1 to match the clean images too)")
    eps: float | None = setting(0.3, "size of the noise / step for --match-on noise|adversarial (null: --eps)",
                                flag="--match-eps", ge=0)
    noise: Noise = setting(
        "uniform", "noise of --match-on noise: uniform in the eps-ball, sign (its corners), gaussian (standard "
        "deviation --match-eps)", label="noise")
    teacher_input: Literal["auto", "matched", "clean"] = setting(
        "matched", "what the teacher sees: the same perturbed image as the student (matched), or the clean image "
        "(its clean representation is the target, as in adversarial distillation); auto: clean for --match-on "
        "adversarial, matched otherwise")
    steps: int = setting(1, "signed-gradient steps of --match-on adversarial (1: FGSM with random start; each step "
                         "costs one student forward/backward)", flag="--match-steps", ge=1)
    attack: Literal["fgsm", "n-fgsm", "free"] = setting(
        "fgsm", "the step of --match-on adversarial: fgsm (FGSM with a random start of eps, projected; PGD with "
        "--match-steps > 1), n-fgsm (random start of 2 eps, a step of eps, not projected) or free (no attack pass: "
        "the gradient of the training loss itself, from the step's own backward pass, moves each image's "
        "perturbation for the next epoch; needs --match-start previous; costs what --match-on clean does)",
        flag="--match-attack")
    attack_loss: Literal["mismatch", "ce"] = setting(
        "mismatch", "what the step of --match-on adversarial raises: the student's cross-entropy on the labels (as "
        "ARD crafts its examples) or the feature mismatch with the teacher; the same cost", flag="--match-attack-loss")
    step_size: float | None = setting(None, "step of the matching attack, as a multiple of --match-eps (default: "
                                      f"{CARRIED_STEP} with --match-start previous, else the attack's own: 1.25 for "
                                      "fgsm, 1 for n-fgsm, 2.5/steps for several steps)", flag="--match-step-size",
                                      gt=0)
    mix_alpha: float = setting(1.0, "--match-on / --distill-on mixup|cutmix: each mix's share of its own image is "
                               "max(l, 1 - l), l ~ Beta(alpha, alpha)", gt=0)
    shift: int = setting(2, "--match-on shift: the largest shift, in pixels", flag="--match-shift", ge=1)
    clean_weight: float = setting(0.0, "also match on the clean images with this weight (the student runs on both)",
                                  ge=0)
    eps_warmup: float = setting(0.0, "ramp --match-eps up from 0 over this fraction of training",
                                flag="--match-eps-warmup", ge=0, le=1)
    kd_weight: float = setting(0.0, "weight of logit distillation from the teacher", ge=0)
    temperature: float = setting(4.0, "temperature of the logit distillation", flag="--kd-temperature", gt=0)

    @property
    def resolved_ce_weight(self) -> float:
        """The CE weight: the reference code's 0.005; on moved images the CE term is adversarial training (1)."""
        if self.ce_weight is not None:
            return self.ce_weight
        return 1.0 if self.match_on == "adversarial" else 0.005

    @property
    def resolved_teacher_input(self) -> str:
        """`teacher_input`, with auto resolved: the clean image for adversarial matching, the matched one otherwise."""
        if self.teacher_input != "auto":
            return self.teacher_input
        return "clean" if self.match_on == "adversarial" else "matched"

    def check(self, *, carried: bool, cached: bool, pairs: int) -> None:
        """The rules across options: `carried` (a perturbation memory), `cached` (a teacher cache), `pairs` (layer
        pairs matched); each option's own type, choices and bounds are `rrm_hub.settings.check`'s."""
        if self.match_on == "adversarial":
            if self.attack in ("n-fgsm", "free") and self.steps > 1:
                raise RRMError(f"--match-attack {self.attack} takes one step; drop --match-steps or use "
                               "--match-attack fgsm")
            if carried and self.attack == "n-fgsm":
                raise RRMError(NOT_WITH_NFGSM)
            if not carried and self.attack == "free":
                raise RRMError(FREE_NEEDS_MEMORY)
        if cached and (refusal := self.targets_refusal(pairs)):
            raise RRMError(refusal)

    def targets_refusal(self, pairs: int = 0) -> str | None:
        """Why a cache of the teacher's outputs on clean images cannot give these options' targets (None where it
        can): one teacher layer, the teacher on the clean image."""
        if pairs:
            return "--cache-teacher keeps one teacher layer; drop --match or --cache-teacher"
        if self.match_on != "clean" and self.resolved_teacher_input == "matched":
            return CLEAN_ONLY.format(match_on=self.match_on)
        return None

    def objective_options(self) -> dict:
        """These options as `rrm_hub.RRM` keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(RRMOptions)}


@dataclass
class RobustDistillOptions:
    """Options of the robust distillation methods that the RRM options do not give (their attack: --match-eps,
    --match-steps, --match-attack, --match-step-size, --match-eps-warmup, --match-start)."""

    TITLE: ClassVar[str] = "robust distillation (--method ard | rslad | adaad)"
    ard_weight: float = setting(1.0, "ARD's weight a of the distillation term (1 - a weighs CE on the clean images; "
                                "the authors' default 1)", ge=0, le=1)
    ard_temperature: float = setting(30.0, "ARD's temperature (the authors' default 30)", gt=0)
    distill_on: Literal["training", "mixup", "cutmix"] = setting(
        "training", "the images attacked and distilled on: the training images, or a fresh mix of two of them each "
        "step (--mix-alpha), where the teacher's soft labels say what no training label does (the teacher runs live; "
        "a carried attack goes on from the last mix its image led)")
    unlabeled_split: str | None = setting(
        None, "images of --dataset whose labels are never read, that the teacher labels: each step --unlabeled-share "
        "of the images attacked and distilled on are drawn from them (a split, e.g. train[1000:], or rest: the "
        "images of --train-split's split its slice leaves out); the teacher runs live, attacks start at random")
    unlabeled_dataset: str | None = setting(
        None, "take --unlabeled-split's images from this dataset instead of --dataset (Hub id, save_to_disk folder, "
        "IDX files, or a folder of images: no labels needed), its split --unlabeled-split names (default: train, or "
        "its only split); refused where one of them is a test image (pixel hashes, every image read once)")
    unlabeled_share: float = setting(0.5, "the share of each step's distilled images drawn from the unlabeled ones",
                                     gt=0, le=1)

    @property
    def draws_unlabeled(self) -> bool:
        """Whether distillation draws images without labels (--unlabeled-split or --unlabeled-dataset)."""
        return bool(self.unlabeled_split or self.unlabeled_dataset)


def matching_attack(options: RRMOptions, eps: float, norm: str, step_size: float | None) -> Attack:
    """The attack of adversarial matching at `eps`: FGSM-RS, N-FGSM or PGD (steps of `step_size` x eps if set)."""
    if options.steps > 1:
        attack = pgd(eps, norm, options.steps)
    else:
        attack = nfgsm(eps, norm) if options.attack == "n-fgsm" else fgsm(eps, norm)
    return attack if step_size is None else replace(attack, step_size=step_size * eps)
