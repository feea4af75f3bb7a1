"""Push a finished output folder (of recipes/rrm.py or recipes/adversarial_train.py) to the Hub.

    python recipes/push.py rrm-student --hub-model-id user/robust-vit [--hub-private] [--hub-revision main]

Training and sharing can happen on different machines: copy the folder, then push it from anywhere
logged in to the Hub (`huggingface-cli login` or HF_TOKEN).
"""

from __future__ import annotations

import argparse

from rrm_hub.config.runs import check_repo_id
from rrm_hub.errors import one_line_errors
from rrm_hub.hub.push import push_folder, upload_plan


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="an output folder with config.json, model.safetensors and README.md")
    parser.add_argument("--hub-model-id", required=True, help="user/name of the model repo")
    parser.add_argument("--hub-private", action="store_true")
    parser.add_argument("--hub-revision", default=None, help="branch to push to (created if needed)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")
    args = parser.parse_args(argv)
    check_repo_id(args.hub_model_id)
    files = upload_plan(args.folder)
    print(f"{args.folder} -> {args.hub_model_id}: {', '.join(files)}")
    if not args.dry_run:
        print(push_folder(args.folder, args.hub_model_id, private=args.hub_private, revision=args.hub_revision))


if __name__ == "__main__":
    main()
