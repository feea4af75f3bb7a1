"""AutoAttack on a timm model folder, by the authors' pyautoattack alone: no rrm-hub code between the attack and the
model, the cross-check of the AutoAttack figure on a teacher's card (recipes/evaluate.py --suite standard).

    python recipes/autoattack_alone.py --model rrm_hub/assets/fashion-mnist-robust-resnet \
        --idx /usr/share/datasets/fashion-mnist --n-examples 1000 --eps 0.1

The model: config.json + model.safetensors as timm writes them (architecture, model_args, pretrained_cfg's mean and
std), normalized inside a two-line wrapper. The images: the first N of the test split of an MNIST-family IDX folder
(t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]), read with numpy. Prints AutoAttack's own log and writes
the robust accuracy as JSON. `--start` runs a part of them (pyautoattack 0.2.0's own state file cannot be resumed
from: it writes its set of attacks as a string, which never equals the set when read back).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import time
from pathlib import Path

import numpy as np
import timm
import torch
from pyautoattack import AutoAttack
from safetensors.torch import load_file
from torch import nn


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array."""
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def test_images(folder: Path, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    def one(stem: str) -> np.ndarray:
        return read_idx(next(p for p in (folder / stem, folder / f"{stem}.gz") if p.exists()))[start:start + n]

    x = torch.from_numpy(one("t10k-images-idx3-ubyte").copy()).float().div(255).unsqueeze(1)
    return x, torch.from_numpy(one("t10k-labels-idx1-ubyte").astype(np.int64))


class Normalized(nn.Module):
    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="folder with config.json and model.safetensors (timm)")
    parser.add_argument("--idx", required=True, help="IDX folder with the t10k-* test files")
    parser.add_argument("--n-examples", type=int, default=1000)
    parser.add_argument("--eps", type=float, required=True)
    parser.add_argument("--version", default="standard")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="autoattack-alone.json")
    parser.add_argument("--start", type=int, default=0, help="first test image (to run the images in parts)")
    args = parser.parse_args()
    logging.basicConfig(format="%(message)s")
    logging.getLogger("auto-attack").setLevel(logging.DEBUG)  # AutoAttack's own log: accuracy after each attack

    folder, idx = Path(args.model), Path(args.idx)
    for path in (folder / "config.json", folder / "model.safetensors"):
        if not path.is_file():
            parser.error(f"--model {args.model}: no {path.name} there; give a timm folder")
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        if not any((idx / name).is_file() for name in (stem, f"{stem}.gz")):
            parser.error(f"--idx {args.idx}: no {stem}[.gz] there; give an MNIST-family IDX folder")
    config = json.loads((folder / "config.json").read_text())
    net = timm.create_model(config["architecture"], num_classes=config["num_classes"], **config["model_args"])
    net.load_state_dict(load_file(folder / "model.safetensors"))
    model = Normalized(net, config["pretrained_cfg"]["mean"], config["pretrained_cfg"]["std"]).eval()
    x, y = test_images(idx, args.start, args.n_examples)
    started = time.perf_counter()
    attack = AutoAttack(model, norm="Linf", eps=args.eps, version=args.version, seed=args.seed)
    x_adv, y_adv = attack.run_standard_evaluation(x, y, batch_size=args.batch_size)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
        still = (model(x_adv).argmax(1) == y).float().mean().item()
    robust = (y_adv == y).float().mean().item()  # AutoAttack's own verdict
    result = {"model": str(folder), "images": f"{args.idx} t10k [{args.start}:{args.start + len(y)}]",
              "eps": args.eps, "norm": "linf", "version": args.version, "clean_accuracy": clean,
              "robust_accuracy": robust, "robust_accuracy_recomputed": still, "seconds": time.perf_counter() - started}
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
