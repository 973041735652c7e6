"""The ingress's tokenizer (serving/app/tokens.py): tokenizer.json through `tokenizers`, without torch, equal to the
model's transformers tokenizer, checked against the model replica's probe encodings before the first request."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serving.app.config import load_config
from serving.app.tokens import PROBES, TextEncoder, probe_encodings, transformers_encode

BASE = Path(load_config(None).resolved_base_dir())
TEXTS = list(PROBES) + [
    "a", "word " * 300,  # far over the 128 tokens that tokenizer.json's own truncation and padding would give
    "Ada Lovelace worked with Charles Babbage in London on the Analytical Engine.",
    "naïve café résumé — “quotes” and ‘apostrophes’ … ellipsis",
    "URLs like https://example.com/a?b=c&d=e and e-mails a.b@c.org",
]


@pytest.fixture(scope="module")
def model_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(BASE), local_files_only=True)


def test_the_ingress_encodes_as_the_models_tokenizer_without_truncation_or_padding(model_tokenizer):
    enc = TextEncoder(BASE)
    assert enc.backend == "tokenizers"
    for text in TEXTS:
        want = transformers_encode(model_tokenizer, text, offsets=True)
        got = enc.encode(text, offsets=True)
        assert list(got["input_ids"]) == list(want["input_ids"]), text
        assert [tuple(o) for o in got["offset_mapping"]] == [tuple(o) for o in want["offset_mapping"]], text
        assert "offset_mapping" not in enc.encode(text)
    assert len(enc.encode("word " * 300)["input_ids"]) == 302  # [CLS] + 300 + [SEP]: nothing cut, nothing padded
    assert enc.check(probe_encodings(model_tokenizer)) is None and enc.backend == "tokenizers"


def test_the_special_tokens_a_truncation_keeps_are_the_tokenizers_template_on_either_backend(tmp_path,
                                                                                             model_tokenizer):
    from serving.truncation import Ends

    want = Ends((model_tokenizer.cls_token_id,), (model_tokenizer.sep_token_id,))
    assert TextEncoder(BASE).ends() == want == Ends((101,), (102,))
    for f in BASE.iterdir():
        if f.is_file() and f.name != "tokenizer.json" and f.suffix in (".json", ".txt"):
            shutil.copy(f, tmp_path / f.name)
    slow = TextEncoder(tmp_path)
    assert slow.backend == "transformers" and slow.ends() == want


def test_a_difference_from_the_models_probes_switches_the_ingress_to_transformers(model_tokenizer):
    probes = probe_encodings(model_tokenizer)
    probes[3]["ids"][1] += 1  # the model's tokenizer encodes one probe otherwise (e.g. its config adds a token)
    enc = TextEncoder(BASE)
    why = enc.check(probes)
    assert why is not None and json.dumps(PROBES[3]) in why and enc.backend == "transformers"
    want = transformers_encode(model_tokenizer, "Ada Lovelace", offsets=True)
    got = enc.encode("Ada Lovelace", offsets=True)
    assert list(got["input_ids"]) == list(want["input_ids"]) and list(got["offset_mapping"]) == list(
        want["offset_mapping"])
    assert enc.check(probe_encodings(model_tokenizer)) is None and enc.backend == "transformers"  # checked once

    silent = TextEncoder(BASE)  # a model replica that sends no probes (an older one): not trusted either
    assert silent.check(None) is not None and silent.backend == "transformers"


def test_without_tokenizer_json_the_ingress_uses_transformers(tmp_path, model_tokenizer):
    for f in BASE.iterdir():
        if f.is_file() and f.name != "tokenizer.json" and f.suffix in (".json", ".txt"):
            shutil.copy(f, tmp_path / f.name)
    enc = TextEncoder(tmp_path)
    assert enc.backend == "transformers" and "no tokenizer.json" in enc.fallback_reason
    assert list(enc.encode("the cat sat")["input_ids"]) == list(model_tokenizer("the cat sat")["input_ids"])
    assert enc.check(None) is None  # nothing left to check: it tokenizes as the model does


def test_the_ingress_module_and_its_tokenizer_do_not_import_torch():
    code = ("import sys; import serving.app.http; from serving.app.tokens import TextEncoder; "
            f"TextEncoder({str(BASE)!r}).encode('hello', True); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_ingress_checks_its_encoder_off_the_event_loop_and_first_requests_wait_for_it(model_tokenizer):
    """A difference loads transformers' tokenizer (seconds): the ingress's loop keeps running meanwhile, and no
    request is encoded before the switch."""
    import asyncio
    import threading

    from serving.app.http import Ingress

    probes = probe_encodings(model_tokenizer)
    probes[0]["ids"][1] += 1
    loading = threading.Event()
    release = threading.Event()

    class SlowEncoder(TextEncoder):
        def _use_transformers(self):
            loading.set()
            assert release.wait(10)
            super()._use_transformers()

    class Info:
        def remote(self):
            async def answer():
                return {"probes": probes, "max_tokens": 512}
            return answer()

    ingress = object.__new__(Ingress.func_or_class)
    ingress.model = type("Model", (), {"info": Info()})()
    ingress.encoder, ingress._info, ingress._encoder_check = SlowEncoder(BASE), None, None

    async def main():
        first = [asyncio.create_task(ingress._model_info()) for _ in range(2)]
        while not loading.is_set():
            await asyncio.sleep(0.005)  # the loop runs while the check loads transformers in its thread
        await asyncio.sleep(0.02)
        assert not any(t.done() for t in first)  # both first requests wait for the switch
        release.set()
        infos = await asyncio.gather(*first)
        assert all(i["max_tokens"] == 512 for i in infos) and ingress.encoder.backend == "transformers"
        assert ingress.encoder.fallback_reason is not None

    asyncio.run(main())


def test_a_failed_switch_to_transformers_never_leaves_the_differing_tokenizer_in_use(model_tokenizer, monkeypatch):
    import transformers

    probes = probe_encodings(model_tokenizer)
    probes[2]["ids"][1] += 1
    enc = TextEncoder(BASE)

    def broken(*args, **kwargs):
        raise OSError("tokenizer files unreadable")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken)
    with pytest.raises(OSError):
        enc.check(probes)
    with pytest.raises(RuntimeError, match="no tokenizer"):  # a 500, not ids from the tokenizer that differs
        enc.encode("Ada Lovelace")
