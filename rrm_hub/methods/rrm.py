"""`RRM`: Robust Representation Matching (Vaishnavi et al., 2022) against a frozen teacher, built from three parts:
the teacher's targets (`TeacherTargets`), the images matched on (an input maker) and the loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import settings
from ..attacks import Attack
from ..errors import RRMError
from ..models.align import MatchedPair
from ..teachers.cache import TeacherCache
from .base import Logs, ObjectiveBase, warmup_scale
from .inputs import AttackedInputs, CleanInputs, FreeInputs, InputMaker, MixedInputs, NoisyInputs, ShiftedInputs
from .losses import Mismatch, distillation_loss
from .memory import CARRIED_STEP, PerturbationMemory
from .method import FORWARD, Cost, Method, Parts
from .options import RRMOptions, matching_attack
from .targets import TeacherTargets


def input_maker(options: RRMOptions, norm: str, memory: PerturbationMemory | None,
                step_size: float | None) -> InputMaker:
    """The maker of the images matched on that `options.match_on` (and the attack options) name."""
    if options.match_on == "clean":
        return CleanInputs()
    if options.match_on == "noise":
        return NoisyInputs(options.eps, norm, options.noise)
    if options.match_on in MixedInputs.KINDS:
        return MixedInputs(options.match_on, options.mix_alpha)
    if options.match_on == "shift":
        return ShiftedInputs(options.shift)
    if options.attack == "free":  # moved by the training step's own backward pass, for the next epoch
        return FreeInputs(memory, options.eps, norm, step_size)
    attack_at = lambda factor: matching_attack(options, options.eps * factor, norm, step_size)  # noqa: E731
    return AttackedInputs(attack_at, options.attack_loss, memory)


class RRM(ObjectiveBase):
    """loss = ce_weight * CE + feature_weight * mismatch(z_S, z_T) [+ kd_weight * KD(logits)], on the images matched on.

    The student must return `(logits, features)` for `model(x, return_features=True)` (see `RRMStudent`). The keyword
    options are `rrm_hub.config.RRMOptions` (defaults: the paper's clean matching); what each costs beyond a
    natural step:
    - match_on="clean": on the training images (one teacher forward);
    - "noise": on images plus random `noise` of size `eps`, for teacher and student alike (one teacher forward);
    - "mixup" / "cutmix" / "shift": on mixes of two training images or shifted views, the teacher seeing the same
      (one teacher forward; `clean_weight=1` matches the clean images too: one more teacher forward, and the
      student on twice the batch);
    - "adversarial": on images moved by `steps` signed-gradient steps on the student (`steps` more student
      forward/backwards) that raise its cross-entropy (`attack_loss="ce"`, as ARD crafts its examples) or its
      mismatch with the teacher's clean representation ("mismatch"); `attack="n-fgsm"` is N-FGSM's step (de Jorge
      et al., 2022). With a `memory` (`PerturbationMemory`) each image's attack starts where it ended the epoch
      before (ATTA, Zheng et al., 2020), in steps of `step_size` x eps (default 0.5), and the batches carry their
      `origins`; `attack="free"` (with a memory) takes no attack pass: the training backward moves the perturbation.
    `teacher_input="clean"` makes the teacher's clean representation the target of the perturbed view (as adversarial
    distillation does); `clean_weight > 0` also matches the clean images. `cache` (a `TeacherCache`) replaces the
    teacher's forward on clean images; `pairs` (`RRMStudent.pairs`) match several layers instead of `teacher_layer`,
    the mismatch then the weighted sum of the pairs', each logged as "feat/<teacher>:<student>".
    """

    name = "rrm"

    def __init__(self, teacher: nn.Module, teacher_layer: str | None = None, *, norm: str = "linf",
                 cache: TeacherCache | None = None, pairs: list[MatchedPair] | None = None,
                 memory: PerturbationMemory | None = None, **options):
        self.options = RRMOptions(**options)
        settings.check(self.options)
        adversarial = self.options.match_on == "adversarial"
        self.memory = memory if adversarial else None
        self.options.check(carried=self.memory is not None, cached=cache is not None, pairs=len(pairs or []))
        if self.options.eps is None:
            raise RRMError("RRM needs the matching epsilon: pass eps (a run's --match-eps defaults to its --eps)")
        if pairs and teacher_layer:
            raise RRMError("give either a teacher layer or matched pairs, not both")
        self.pairs = list(pairs or [])
        self.ce_weight = self.options.resolved_ce_weight
        self.teacher_input = self.options.resolved_teacher_input
        self.step_size = self.options.step_size
        if self.step_size is None and self.memory is not None:  # many small steps add up over the epochs
            self.step_size = CARRIED_STEP
        self.eps, self.norm, self.eps_warmup = self.options.eps, norm, self.options.eps_warmup
        self.targets = TeacherTargets(teacher, teacher_layer, self.pairs, cache)
        self.inputs = input_maker(self.options, norm, self.memory, self.step_size)
        self.uses_origins = self.memory is not None
        self.loss = Mismatch(self.options.feature_loss, [pair.weight for pair in self.pairs] or [1.0])

    # the parts, as attributes of the objective
    @property
    def teacher(self) -> nn.Module | None:
        return self.targets.teacher

    @teacher.setter
    def teacher(self, teacher: nn.Module | None) -> None:
        self.targets.teacher = teacher

    @property
    def tap(self):
        return self.targets.tap

    def teacher_outputs(self, x: torch.Tensor):
        """The teacher's logits and representation(s) of `x` (see `TeacherTargets`)."""
        return self.targets(x)

    def teacher_features(self):
        return self.targets.features()

    def mismatch(self, features, targets) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The weighted sum of the pairs' mismatches, and each pair's own."""
        return self.loss(features, targets)

    def remove(self) -> None:
        """Remove the hooks from the teacher."""
        self.targets.remove()

    def schedule(self, progress: float) -> None:
        """Called by the training loop: ramps the matching epsilon up over `eps_warmup` of training."""
        self.inputs.schedule(warmup_scale(progress, self.eps_warmup))

    def matching_attack(self) -> Attack:
        """The attack that moves the matching inputs at the current epsilon."""
        if not isinstance(self.inputs, AttackedInputs):
            raise RRMError(f"--match-on {self.options.match_on} --match-attack {self.options.attack} runs no attack")
        return self.inputs.current

    def matching_inputs(self, model: nn.Module, x: torch.Tensor, clean_target=None, y: torch.Tensor | None = None,
                        origins: torch.Tensor | None = None) -> torch.Tensor:
        """The images on which teacher and student are matched (`clean_target`: the teacher's clean features, found
        when an attack on the mismatch needs them; `y`: the labels, for attacks on the cross-entropy; `origins`: the
        batch's, which a `memory` needs)."""
        mismatch = None
        if self.inputs.reads_clean_target:
            target = self.teacher_outputs(x)[1] if clean_target is None else clean_target
            mismatch = lambda features: self.mismatch(features, target)[0]  # noqa: E731
        return self.inputs(model, x, y, origins, mismatch)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 origins: torch.Tensor | None = None) -> tuple[torch.Tensor, Logs]:
        perturbed, options = self.inputs.perturbs, self.options
        on_clean_target = not perturbed or self.teacher_input == "clean"
        clean = (self.teacher_outputs(x)
                 if on_clean_target or self.inputs.reads_clean_target or options.clean_weight > 0 else None)
        x_view = self.matching_inputs(model, x, clean[1] if clean else None, y, origins)
        target_logits, target = clean if on_clean_target else self.teacher_outputs(x_view)
        both = perturbed and options.clean_weight > 0
        logits, features = model(torch.cat([x_view, x]) if both else x_view, return_features=True)
        n, many = x.shape[0], isinstance(features, (tuple, list))
        ce = F.cross_entropy(logits, y.repeat(2) if both else y)
        mismatch, parts = self.mismatch([f[:n] for f in features] if many else features[:n], target)
        logs = {"ce": ce.detach(), "feat": mismatch.detach()}
        if self.pairs:
            logs.update({f"feat/{pair.name}": part.detach() for pair, part in zip(self.pairs, parts, strict=True)})
        if both:
            clean_mismatch = self.mismatch([f[n:] for f in features] if many else features[n:], clean[1])[0]
            mismatch = mismatch + options.clean_weight * clean_mismatch
            logs["feat_clean"] = clean_mismatch.detach()
        loss = self.ce_weight * ce + options.feature_weight * mismatch
        if options.kd_weight:
            kd = distillation_loss(logits[:n], target_logits, options.temperature)
            loss = loss + options.kd_weight * kd
            logs["kd"] = kd.detach()
        return loss, logs


def _rrm_cost(cost: Cost) -> float:
    """A step of RRM: the attack's student passes (adversarial matching), the student's pass on the view (and on the
    clean images with --clean-weight), and the teacher's forwards (on the view, and on the clean images where the
    target or the attack needs them), none when cached."""
    options = cost.options
    both = options.clean_weight > 0 and options.match_on != "clean"  # the student runs on the view and the clean
    student = 2.0 if both else 1.0
    if options.match_on != "adversarial":
        return student + (cost.teacher * (2 if both else 1))
    attack = 0.0 if options.attack == "free" else float(options.steps)
    clean_too = both or options.attack_loss == "mismatch"  # the teacher's clean outputs are needed besides the view's
    views = 2 if clean_too and options.resolved_teacher_input == "matched" else 1
    return attack + student + cost.teacher * views


def _rrm(parts: Parts, **override) -> RRM:
    options = {**parts.options.objective_options(), "eps": parts.matching_eps, **override}
    layers = {"pairs": list(parts.pairs)} if parts.pairs else {"teacher_layer": parts.teacher_layer}
    return RRM(parts.teacher, norm=parts.norm, memory=parts.memory, cache=parts.cache, **layers, **options)


def _clean(parts: Parts, cache: TeacherCache | None = None) -> RRM:
    """The paper's matching on the clean images, at one layer (with the teacher's outputs looked up in `cache`)."""
    options = {**parts.options.objective_options(), "eps": parts.matching_eps, "match_on": "clean"}
    return RRM(parts.teacher, parts.teacher_layer, norm=parts.norm, cache=cache, **options)


def _cached(parts: Parts) -> RRM:
    if parts.cache is None:
        raise RRMError("method 'rrm_cached' needs a teacher cache (rrm_hub.teachers.cache.TeacherCache)")
    return _clean(parts, parts.cache)


def rrm_facts(objective: RRM) -> dict:
    """metrics.json's account of an RRM objective: its options as resolved."""
    return {"rrm_options": {**objective.options.objective_options(), "ce_weight": objective.ce_weight,
                            "teacher_input": objective.teacher_input, "step_size": objective.step_size,
                            "norm": objective.norm, "match_start": "previous" if objective.memory else "random"}}


def _check(options: RRMOptions, *, cached: bool, pairs: int, carried: bool) -> None:
    options.check(carried=carried, cached=cached, pairs=pairs)


METHODS = [
    Method("rrm", "the teacher's representation, matched as the RRM options say", ("distill", "benchmark"), _rrm,
           _rrm_cost, teacher=True, cache="can", check=_check, facts=rrm_facts,
           carries=lambda options, match_start: options.match_on == "adversarial" and match_start == "previous"),
    Method("rrm_clean", "the paper's matching on the clean images", ("benchmark",),
           _clean, lambda cost: 1.0 + cost.teacher_ratio * FORWARD, teacher=True, facts=rrm_facts),
    Method("rrm_cached", "the paper's matching with the teacher's outputs looked up in a cache", ("benchmark",),
           _cached, lambda cost: 1.0, teacher=True, cache="needs", facts=rrm_facts),
]
