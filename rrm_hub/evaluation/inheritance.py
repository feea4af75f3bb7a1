"""Does a student inherit its teacher's robustness, or only its accuracy? Each model attacked, and each judged on
the other's adversarial examples: if the teacher is still right where the student was fooled, the student's
weaknesses are its own and the teacher's function did not reach the student inside the threat ball.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..attacks import pgd
from ..progress import progress


def inheritance(student: nn.Module, teacher: nn.Module, loader: DataLoader, eps: float, norm: str = "linf",
                steps: int = 20, show: bool = True) -> dict:
    """Shares of the images in `loader` (PGD-`steps` at `eps`, each model attacked through its own gradients):

    - `student` / `teacher`: clean and robust accuracy of each;
    - `teacher_on_student_attacks`: the teacher's accuracy on the student's adversarial examples, and
      `student_on_teacher_attacks` the reverse (attacks that transfer hit a shared weakness);
    - `agreement_clean` / `agreement_on_student_attacks`: how often the two predict the same class;
    - `teacher_confidence`: the teacher's mean top-class probability on the clean images (1.0: its soft labels say
      no more than the labels).
    """
    attack = pgd(eps, norm, steps)
    student_mode, teacher_mode = student.training, teacher.training
    student.eval(), teacher.eval()
    counts: dict[str, float] = {}
    total = 0
    for x, y in progress(loader, desc="inheritance", disable=not show, leave=False):
        x_student, x_teacher = attack(student, x, y), attack(teacher, x, y)
        with torch.inference_mode():
            s_clean, t_probs = student(x).argmax(1), teacher(x).softmax(1)
            t_clean = t_probs.argmax(1)
            s_adv, t_on_s = student(x_student).argmax(1), teacher(x_student).argmax(1)
            t_adv, s_on_t = teacher(x_teacher).argmax(1), student(x_teacher).argmax(1)
        rows = {"student_clean": s_clean == y, "student_robust": s_adv == y, "teacher_clean": t_clean == y,
                "teacher_robust": t_adv == y, "teacher_on_student_attacks": t_on_s == y,
                "student_on_teacher_attacks": s_on_t == y, "agreement_clean": s_clean == t_clean,
                "agreement_on_student_attacks": s_adv == t_on_s, "teacher_confidence": t_probs.amax(1)}
        for name, values in rows.items():
            counts[name] = counts.get(name, 0.0) + values.float().sum().item()
        total += len(y)
    student.train(student_mode), teacher.train(teacher_mode)
    shares = {name: value / max(total, 1) for name, value in counts.items()}
    return {
        "student": {"clean": shares.pop("student_clean"), "robust": shares.pop("student_robust")},
        "teacher": {"clean": shares.pop("teacher_clean"), "robust": shares.pop("teacher_robust")},
        **shares, "eps": eps, "norm": norm, "steps": steps, "num_examples": total,
    }
