"""Training objectives: each maps (model, pixels, labels) to (loss, logs). The loop in `train.py` is shared.

- `Natural`: cross-entropy on clean images.
- `AdversarialTraining`: cross-entropy on attacked images (PGD-AT with `pgd`, fast-AT with `fgsm`, N-FGSM-AT
  with `nfgsm`).
- `FreeAdversarialTraining`: free-AT, minibatch replays with a persistent perturbation.
- `Distillation`: logit distillation from the teacher (KD).
- `RRM`: Robust Representation Matching, `w_ce * CE + w_feat * (1 - cos(z_S, z_T))`, at one or several
  pairs of layers.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from . import align
from .attacks import Attack, ascent_direction, fgsm, nfgsm, pgd, project, random_perturbation
from .errors import RRMError
from .features import FeatureTap
from .memory import CARRIED_STEP, MemoryCheckpointing, PerturbationMemory, refuse_carry
from .teacher_cache import CLEAN_ONLY, TeacherCache

Logs = dict[str, torch.Tensor]


class Natural:
    """Plain cross-entropy training."""

    name = "natural"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Logs]:
        loss = F.cross_entropy(model(x), y)
        return loss, {"ce": loss.detach()}


def warmup_scale(progress: float, warmup: float) -> float:
    """Linear ramp from 0 to 1 over the first `warmup` fraction of training."""
    return min(1.0, progress / warmup) if warmup > 0 else 1.0


class AdversarialTraining(MemoryCheckpointing):
    """Cross-entropy on adversarial examples made by `attack` against the model being trained.

    `eps_warmup` ramps epsilon linearly from 0 over that fraction of training (PGD-AT at a large
    epsilon, e.g. 0.3 on MNIST, often never leaves chance level without it). With a `memory`
    (`PerturbationMemory`) each image's attack starts where it ended the epoch before (ATTA); the batches then
    carry their origins.
    """

    def __init__(self, attack: Attack, name: str | None = None, eps_warmup: float = 0.0,
                 memory: PerturbationMemory | None = None):
        self.attack = self.current = attack
        self.eps_warmup, self.memory = eps_warmup, memory
        self.name = name or {"fgsm": "fast_at", "nfgsm": "nfgsm_at"}.get(attack.name, "pgd_at")

    def schedule(self, progress: float) -> None:
        """Called by the training loop with the fraction of training done."""
        self.current = self.attack.scaled(warmup_scale(progress, self.eps_warmup))

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 origins: torch.Tensor | None = None) -> tuple[torch.Tensor, Logs]:
        if self.memory is None:
            x_adv = self.current(model, x, y)
        else:
            x_adv = self.memory.continue_attack(self.current, lambda x_adv: F.cross_entropy(model(x_adv), y), x,
                                                origins)
        loss = F.cross_entropy(model(x_adv), y)
        return loss, {"ce": loss.detach(), "eps": torch.tensor(self.current.eps)}


class FreeAdversarialTraining:
    """Free adversarial training (Shafahi et al., 2019): each minibatch is replayed `replays` times, and the
    backward pass that updates the weights also gives the gradient that moves a perturbation kept across
    replays and minibatches (an ascent step of `eps`). Train `replays` times fewer epochs for the same cost.
    """

    name = "free_at"

    def __init__(self, eps: float, norm: str = "linf", replays: int = 4):
        if replays < 1:
            raise RRMError("free adversarial training needs --replays >= 1")
        self.eps, self.norm, self.replays = eps, norm, replays
        self.delta: torch.Tensor | None = None
        self.grad: torch.Tensor | None = None

    def _keep_grad(self, grad: torch.Tensor) -> None:
        self.grad = grad.detach()

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Logs]:
        if self.delta is None or self.delta.shape != x.shape:
            self.delta, self.grad = torch.zeros_like(x), None
        if self.grad is not None:  # the ascent step from the previous replay's backward pass
            self.delta = project(self.delta + self.eps * ascent_direction(self.grad, self.norm), self.eps, self.norm)
            self.grad = None
        delta = ((x + self.delta).clamp(0, 1) - x).detach().requires_grad_(True)
        delta.register_hook(self._keep_grad)
        self.delta = delta.detach()
        loss = F.cross_entropy(model(x + delta), y)
        return loss, {"ce": loss.detach()}


class Distillation:
    """Logit distillation (Hinton et al., 2015) from the teacher: the RRM paper's comparison."""

    name = "kd"

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, kd_weight: float = 0.9):
        self.teacher, self.temperature, self.kd_weight = teacher, temperature, kd_weight

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Logs]:
        with torch.inference_mode():
            teacher_logits = self.teacher(x)
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        kd = distillation_loss(logits, teacher_logits.clone(), self.temperature)
        return (1 - self.kd_weight) * ce + self.kd_weight * kd, {"ce": ce.detach(), "kd": kd.detach()}


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Mismatch of two (B, D) representations: `1 - cos` averaged over the batch, or mean squared error.

    For two (B, C, h, w) maps the cosine is taken over C at each location and averaged over locations and batch.
    """
    if kind == "cosine":
        return 1 - F.cosine_similarity(student.float(), teacher.float(), dim=1).mean()
    if kind == "l2":
        return F.mse_loss(student.float(), teacher.float())
    raise RRMError(f"unknown feature loss '{kind}'; use cosine or l2")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper: attacks run on it, outside gradient sync."""
    return getattr(model, "module", model)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s KL(teacher || student) on temperature-softened logits, scaled by T^2."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, dim=1), F.softmax(teacher_logits.float() / t, dim=1),
                    reduction="batchmean") * t * t


class RRM(MemoryCheckpointing):
    """Robust Representation Matching (Vaishnavi et al., 2022) against a frozen teacher.

    loss = ce_weight * CE + feature_weight * mismatch(z_S, z_T) [+ kd_weight * KD(logits)], CE on the images
    matched on; `ce_weight` defaults to the reference code's 0.005, and to 1 for adversarial matching (where the CE
    term trains on the moved images, as adversarial training does).
    The student must return `(logits, features)` for `model(x, return_features=True)` (see `RRMStudent`).
    Where the representations are matched (`match_on`), and what each costs beyond a natural step:
    - "clean": on the training images, the paper's method (one teacher forward);
    - "noise": on images plus random `noise` of size `eps` ("uniform" in the eps-ball, "sign" on its
      corners, "gaussian"), for teacher and student alike (one teacher forward, same as "clean");
    - "adversarial": on images moved by `steps` signed-gradient steps (from a random start; one step is
      FGSM-RS) that maximise the student's mismatch with the teacher's clean representation (`steps` more
      student forward/backwards); `attack="n-fgsm"` makes the one step N-FGSM's (a random start of 2 eps, a step
      of eps, not projected back into the ball; de Jorge et al., 2022), against catastrophic overfitting at large eps.
      `attack_loss="ce"` moves the images to raise the student's cross-entropy on the labels instead of the
      mismatch (as ARD crafts its examples); the same cost. With a `memory` (`PerturbationMemory`) each image's
      attack starts from where its attack ended the epoch before instead of a random start (ATTA, Zheng et al.,
      2020): the steps add up over epochs at no extra compute; the batches then carry `origins` (`make_loader(...,
      origins=True)`). `attack="free"` (with a memory) takes no attack step of its own: the training step's backward
      pass moves each image's perturbation along the gradient of the training loss for the next epoch (free-AT's
      trick), so adversarial matching costs what clean matching does. `step_size` sets the attack's step as a
      multiple of eps (default: `memory.CARRIED_STEP`, 0.5, with a memory, else the attack's own).
      (Defaults here are the paper's and the first variants'; `recipes/rrm.py` defaults to adversarial matching
      with `attack_loss="ce"`, a memory and steps of 0.5 eps.)
    `teacher_input="clean"` gives the student's perturbed view the teacher's clean representation as target
    (as adversarial distillation does) instead of the teacher's view of the same perturbed image.
    `clean_weight > 0` also matches the clean images (the student runs on both: twice the batch).
    `cache` (a `TeacherCache`) replaces the teacher's forward on the clean images by a lookup.
    `pairs` (the student's `RRMStudent.pairs`) matches several layers instead of `teacher_layer`: one hook
    per teacher layer, mismatch = sum_i weight_i * mismatch_i, each pair logged as "feat/<teacher>:<student>".
    """

    name = "rrm"
    MATCH_ON = ("clean", "noise", "adversarial")
    TEACHER_INPUTS = ("matched", "clean")
    ATTACKS = ("fgsm", "n-fgsm", "free")
    ATTACK_LOSSES = ("mismatch", "ce")

    def __init__(
        self,
        teacher: nn.Module,
        teacher_layer: str | None = None,
        ce_weight: float | None = None,
        feature_weight: float = 1.0,
        kind: str = "cosine",
        match_on: str = "clean",
        eps: float = 0.3,
        norm: str = "linf",
        kd_weight: float = 0.0,
        temperature: float = 4.0,
        eps_warmup: float = 0.0,
        noise: str = "uniform",
        teacher_input: str = "matched",
        clean_weight: float = 0.0,
        steps: int = 1,
        attack: str = "fgsm",
        attack_loss: str = "mismatch",
        step_size: float | None = None,
        cache: TeacherCache | None = None,
        pairs: list[dict] | None = None,
        memory: PerturbationMemory | None = None,
    ):
        if match_on not in self.MATCH_ON:
            raise RRMError(f"unknown --match-on '{match_on}'; use one of {', '.join(self.MATCH_ON)}")
        if teacher_input not in self.TEACHER_INPUTS:
            raise RRMError(f"unknown --teacher-input '{teacher_input}'; use one of {', '.join(self.TEACHER_INPUTS)}")
        random_perturbation(torch.zeros(1), 0.0, norm, noise)  # refuses an unknown noise now, not mid-run
        if pairs and teacher_layer:
            raise RRMError("give either a teacher layer or matched pairs, not both")
        self.teacher = teacher
        self.pairs = [dict(pair) for pair in pairs] if pairs else []
        layers = [pair["teacher_layer"] for pair in self.pairs] or [teacher_layer]
        self.taps = {}
        for layer in layers:
            if layer not in self.taps:
                self.taps[layer] = FeatureTap(teacher.network, layer)
        self.tap = self.taps[layers[0]]
        if ce_weight is None:  # the reference code's 0.005; on moved images the CE term is adversarial training
            ce_weight = 1.0 if match_on == "adversarial" else 0.005
        self.ce_weight, self.feature_weight, self.kind = ce_weight, feature_weight, kind
        self.match_on, self.eps, self.norm, self.noise = match_on, eps, norm, noise
        self.teacher_input, self.clean_weight = teacher_input, clean_weight
        if steps < 1:
            raise RRMError(f"--match-steps must be >= 1, got {steps}")
        if attack not in self.ATTACKS:
            raise RRMError(f"unknown --match-attack '{attack}'; use one of {', '.join(self.ATTACKS)}")
        if attack in ("n-fgsm", "free") and steps > 1 and match_on == "adversarial":
            raise RRMError(f"--match-attack {attack} takes one step; drop --match-steps or use --match-attack fgsm")
        if attack_loss not in self.ATTACK_LOSSES:
            raise RRMError(f"unknown --match-attack-loss '{attack_loss}'; use one of {', '.join(self.ATTACK_LOSSES)}")
        if step_size is not None and step_size <= 0:
            raise RRMError(f"--match-step-size must be > 0, got {step_size}")
        self.steps, self.attack, self.attack_loss, self.step_size = steps, attack, attack_loss, step_size
        self.kd_weight, self.temperature = kd_weight, temperature
        self.eps_warmup, self.current_eps = eps_warmup, eps
        if cache is not None and self.pairs:
            raise RRMError("--cache-teacher keeps one teacher layer; drop --match or --cache-teacher")
        if cache is not None and match_on != "clean" and teacher_input == "matched":
            raise RRMError(CLEAN_ONLY.format(match_on=match_on))
        self.cache = cache
        if match_on == "adversarial":
            refuse_carry(attack, memory is not None)
        self.memory = memory if match_on == "adversarial" else None
        if self.step_size is None and self.memory is not None:  # many small steps add up over the epochs
            self.step_size = CARRIED_STEP

    def schedule(self, progress: float) -> None:
        """Called by the training loop: ramps the matching epsilon up over `eps_warmup` of training."""
        self.current_eps = self.eps * warmup_scale(progress, self.eps_warmup)

    def teacher_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's logits and representation of `x`, computed without building a graph (or looked up in
        the cache, which `__init__` allows only where the teacher sees nothing but the clean images)."""
        if self.cache is not None:
            return self.cache.lookup(x)
        with torch.inference_mode():
            logits = self.teacher(x)
            features = self.teacher_features()
        clone = tuple(f.clone() for f in features) if isinstance(features, tuple) else features.clone()
        return logits.clone(), clone  # normal tensors, usable in the student's graph

    def teacher_features(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """What the taps recorded in the last teacher forward: pooled (B, D) features, or one view per pair."""
        if not self.pairs:
            return self.tap.pop()
        network = self.teacher.network
        raw = {layer: tap.pop_raw() for layer, tap in self.taps.items()}
        prefix, nhwc = getattr(network, "num_prefix_tokens", None), align.channels_last(network)
        return tuple(align.view(raw[p["teacher_layer"]], p["mode"], p.get("grid"), prefix, nhwc, p["teacher_layer"])
                     for p in self.pairs)

    def mismatch(self, features, targets) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The weighted sum of the pairs' mismatches, and each pair's own."""
        features = list(features) if isinstance(features, (tuple, list)) else [features]
        targets = list(targets) if isinstance(targets, (tuple, list)) else [targets]
        if len(features) != len(targets):
            raise RRMError(f"the student returns {len(features)} matched representations but the objective "
                           f"matches {len(targets)} layers; build both from the same pairs")
        for feature, target in zip(features, targets, strict=True):
            if feature.shape[1:] != target.shape[1:]:
                raise RRMError(f"student features have shape {tuple(feature.shape[1:])} but the teacher's have "
                               f"{tuple(target.shape[1:])}; build the student with RRMStudent.for_teacher")
        parts = [feature_loss(f, t, self.kind) for f, t in zip(features, targets, strict=True)]
        weights = [pair["weight"] for pair in self.pairs] or [1.0]
        total = sum(w * part for w, part in zip(weights, parts, strict=True))
        return total, parts

    def remove(self) -> None:
        """Remove the hooks from the teacher."""
        for tap in self.taps.values():
            tap.remove()

    def matching_attack(self) -> Attack:
        """The attack that moves the matching inputs at the current epsilon: FGSM-RS, N-FGSM or PGD (with
        `step_size` x eps steps where that is set)."""
        eps, norm = self.current_eps, self.norm
        if self.steps > 1:
            attack = pgd(eps, norm, self.steps)
        else:
            attack = nfgsm(eps, norm) if self.attack == "n-fgsm" else fgsm(eps, norm)
        return attack if self.step_size is None else replace(attack, step_size=self.step_size * eps)

    def matching_inputs(self, model: nn.Module, x: torch.Tensor, clean_target: torch.Tensor | None = None,
                        y: torch.Tensor | None = None, origins: torch.Tensor | None = None) -> torch.Tensor:
        """The images on which teacher and student are matched (`clean_target`: the teacher's clean features;
        `y`: the labels, which `attack_loss="ce"` needs; `origins`: the batch's, which a `memory` needs)."""
        if self.match_on == "noise":
            return (x + random_perturbation(x, self.current_eps, self.norm, self.noise)).clamp(0, 1)
        if self.match_on != "adversarial":
            return x
        if self.attack == "free":  # moved by the training step's own backward pass, for the next epoch
            return self.memory.free_view(self.current_eps, self.norm, self.step_size * self.current_eps, x, origins)
        student = unwrap(model)
        if self.attack_loss == "ce" and y is None:
            raise RRMError("attack_loss='ce' moves the images against the labels: pass y")
        if self.attack_loss == "mismatch" and clean_target is None:
            clean_target = self.teacher_outputs(x)[1]

        def loss_of(x_adv: torch.Tensor) -> torch.Tensor:
            if self.attack_loss == "ce":
                return F.cross_entropy(student(x_adv), y)
            return self.mismatch(student(x_adv, return_features=True)[1], clean_target)[0]

        if self.memory is None:
            return self.matching_attack().maximize(loss_of, x)
        return self.memory.continue_attack(self.matching_attack(), loss_of, x, origins)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 origins: torch.Tensor | None = None) -> tuple[torch.Tensor, Logs]:
        perturbed = self.match_on != "clean"
        attacks_mismatch = self.match_on == "adversarial" and self.attack_loss == "mismatch" and self.attack != "free"
        needs_clean_teacher = (not perturbed or attacks_mismatch or self.teacher_input == "clean"
                               or self.clean_weight > 0)
        clean = self.teacher_outputs(x) if needs_clean_teacher else None
        x_view = self.matching_inputs(model, x, clean[1] if clean else None, y, origins)
        same_as_clean = not perturbed or self.teacher_input == "clean"
        target_logits, target = clean if same_as_clean else self.teacher_outputs(x_view)
        both = perturbed and self.clean_weight > 0
        logits, features = model(torch.cat([x_view, x]) if both else x_view, return_features=True)
        n = x.shape[0]
        many = isinstance(features, (tuple, list))
        ce = F.cross_entropy(logits, y.repeat(2) if both else y)
        mismatch, parts = self.mismatch([f[:n] for f in features] if many else features[:n], target)
        logs = {"ce": ce.detach(), "feat": mismatch.detach()}
        if self.pairs:
            logs.update({f"feat/{pair['teacher_layer']}:{pair['student_layer'] or align.PENULTIMATE}": part.detach()
                         for pair, part in zip(self.pairs, parts, strict=True)})
        if both:
            clean_mismatch = self.mismatch([f[n:] for f in features] if many else features[n:], clean[1])[0]
            mismatch = mismatch + self.clean_weight * clean_mismatch
            logs["feat_clean"] = clean_mismatch.detach()
        loss = self.ce_weight * ce + self.feature_weight * mismatch
        if self.kd_weight:
            kd = distillation_loss(logits[:n], target_logits, self.temperature)
            loss = loss + self.kd_weight * kd
            logs["kd"] = kd.detach()
        return loss, logs
