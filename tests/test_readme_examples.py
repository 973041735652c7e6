"""The README example checker (tests/readme_examples.py) finds examples and tells outputs apart."""
from tests.readme_examples import examples, mismatch

README = '''
text
```console
$ curl -s 127.0.0.1:8000/v1/classify \\
    -d '{"model": "x"}'
{"label":"pos","probs":[0.0058,0.9942]}
$ .venv/bin/python - <<'PY'
print(1)
$ not a command
PY
1
```
```
$ not an example (not a console block)
```
'''


def test_examples_are_commands_with_continuations_and_heredocs_and_their_output():
    found = examples(README)
    assert [e.command for e in found] == [
        "curl -s 127.0.0.1:8000/v1/classify \\\n    -d '{\"model\": \"x\"}'",
        ".venv/bin/python - <<'PY'\nprint(1)\n$ not a command\nPY",
    ]
    assert [e.expected for e in found] == ['{"label":"pos","probs":[0.0058,0.9942]}', "1"]
    assert found[0].line == 4


def test_numbers_compare_within_tolerance_and_text_exactly():
    expected = '{"label":"pos","probs":[0.0058,0.9942]}'
    assert mismatch(expected, '{"label":"pos","probs":[0.005812345,0.99418765]}') is None
    assert mismatch(expected, '{"label":"neg","probs":[0.0058,0.9942]}') is not None
    assert mismatch(expected, '{"label":"pos","probs":[0.3,0.7]}') is not None
    assert mismatch(expected, '{"label":"pos","probs":[0.0058,0.9942],"extra":1}') is not None
    assert mismatch("version 2", "version 2.0") is not None  # an integer stays an integer


def test_ellipsis_stands_for_any_text_and_whitespace_runs_are_one():
    assert mismatch('{"id":"...","n":3}', '{"id":"f00d-12","n":3}') is None
    assert mismatch("[0.1, 0.2, ...]", "[0.1, 0.2, 0.3, 0.4]") is None
    assert mismatch("a   b\n c", "a b c") is None
    assert mismatch('{"id":"...","n":3}', '{"id":"f00d-12","n":4}') is not None
