"""Adversarial training (PGD-AT, fast-AT, N-FGSM or ATTA) of any timm model on any image dataset.

    python recipes/adversarial_train.py --model resnet18 --method pgd_at --eps 0.3

Writes a Hub-format folder: config.json + model.safetensors (timm layout), README.md (a card with the
measured robustness and the command that made it), metrics.json, robustness.png and run_config.yaml. This
recipe produced the bundled default teacher (see its card in rrm_hub/assets/).
"""

from __future__ import annotations

from rrm_hub import AdversarialTrainConfig, adversarial_train, cli
from rrm_hub.errors import one_line_errors


@one_line_errors
def main(argv: list[str] | None = None) -> dict:
    config = cli.parse(AdversarialTrainConfig, argv, description=__doc__)
    return adversarial_train(config).metrics


if __name__ == "__main__":
    main()
