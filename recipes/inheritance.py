"""Did the student inherit its teacher's robustness? Both attacked, each judged on the other's adversarial examples.

    python recipes/inheritance.py --model <student folder or hub id> --teacher <teacher> --dataset <hub id>
    python recipes/inheritance.py --model rrm-student            # against the bundled teacher, embedded MNIST

Prints and writes inheritance.json: clean and PGD accuracy of each model, the teacher's accuracy on the student's
adversarial examples (high where the student's weaknesses are its own), the student's on the teacher's, how often
the two agree, and the teacher's mean confidence (how much its soft labels say beyond the labels).
"""

from __future__ import annotations

from pathlib import Path

from rrm_hub import TrainConfig, cli, make_loader
from rrm_hub.config.tools import InheritanceConfig
from rrm_hub.errors import RRMError, one_line_errors
from rrm_hub.evaluation.inheritance import inheritance
from rrm_hub.hub.cards import save_json
from rrm_hub.runs import builders


@one_line_errors
def main(argv: list[str] | None = None) -> dict:
    config = cli.parse(InheritanceConfig, argv, description=__doc__)
    accelerator = builders.make_accelerator(TrainConfig(seed=config.seed))
    student, teacher = config.model.load(accelerator.device), config.teacher.load(accelerator.device)
    images = builders.load_data(config.data, config.seed)
    if not student.num_classes == teacher.num_classes == images.num_classes:
        raise RRMError(f"student ({student.num_classes} classes), teacher ({teacher.num_classes}) and dataset "
                       f"({images.num_classes}) must agree; give the pair's own dataset")
    loader = make_loader(images, "test", config.batch_size, limit=config.n_examples, num_workers=0)
    result = {**inheritance(student, teacher, loader, config.eps, config.norm, config.steps),
              "model": getattr(student, "source", config.model.name),
              "teacher_model": getattr(teacher, "source", config.teacher.name), "dataset": images.name}
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_json(result, output_dir / "inheritance.json")
    cli.save(config, output_dir, "inheritance.py")
    print(f"\n{result['num_examples']} test images, {config.norm} eps {config.eps:g}, PGD-{config.steps}")
    print(f"  student: clean {result['student']['clean']:.1%}, robust {result['student']['robust']:.1%}")
    print(f"  teacher: clean {result['teacher']['clean']:.1%}, robust {result['teacher']['robust']:.1%}")
    print(f"  teacher on the student's attacks {result['teacher_on_student_attacks']:.1%}; student on the "
          f"teacher's {result['student_on_teacher_attacks']:.1%}")
    print(f"  agreement: clean {result['agreement_clean']:.1%}, on the student's attacks "
          f"{result['agreement_on_student_attacks']:.1%}; teacher confidence {result['teacher_confidence']:.1%}")
    print(f"saved to {output_dir}")
    return result


if __name__ == "__main__":
    main()
