"""What RRM costs at natural resolution: a ViT-S/16 student at 224 px and a ResNet-50 teacher.

    python recipes/benchmark_scale.py                      # on this machine's CPUs or GPU
    python recipes/benchmark_scale.py --mixed-precision bf16 --channels-last --compile --batch-size 128

A few optimizer steps each of natural training, RRM with the paper's clean matching (rrm_clean), the recipe's
default matching (rrm) and clean matching with the teacher's outputs cached (rrm_cached); writes
benchmark-scale.json (methods.<name>.seconds_per_step, .step_cost_vs_natural, .saved_activation_bytes;
loader_images_per_second, train_images_per_second) and prints a table.
"""

from __future__ import annotations

from pathlib import Path

from rrm_hub import cli
from rrm_hub.errors import one_line_errors
from rrm_hub.hub.cards import save_json
from rrm_hub.runs.scale import ScaleConfig, markdown_table, run_scale
from rrm_hub.training.distributed import make_accelerator


@one_line_errors
def main(argv: list[str] | None = None) -> dict:
    config = cli.parse(ScaleConfig, argv, description=__doc__)
    accelerator = make_accelerator(config.training)
    summary = run_scale(config, accelerator)
    summary["command"] = cli.command("benchmark_scale.py", config)
    if accelerator.is_main_process:
        save_json(summary, Path(config.output))
    accelerator.print(markdown_table(summary))
    return summary


if __name__ == "__main__":
    main()
