"""The readers of user files and flags, fuzzed: JSONL and plain-text data, CoNLL and the encoder tasks' records,
YAML / JSON configs, and the flags' values. Whatever the input (arbitrary bytes, another encoding, huge lines,
deeply nested JSON, wrong types), the outcome is the parsed data or one error (DataError / ConfigError) whose
message names the file (and, for a line's problem, the line). Never another exception, never a traceback."""
import dataclasses
import json
import os
import tempfile

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fastnlg.train.config import ConfigError, TrainConfig, load_config_file
from fastnlg.train.data import DataError, read_records
from fastnlg.train.tasks import encoder_data
from tests.property.conftest import examples

# JSON-ish values: scalars of every type, nested lists and objects
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
LINES = st.one_of(
    st.binary(max_size=200),                                               # arbitrary bytes
    st.text(max_size=80).map(lambda t: t.encode("utf-16")),                # another encoding
    st.text(max_size=80).map(lambda t: t.encode("latin-1", "replace")),
    JSON.map(lambda v: json.dumps(v).encode()),                            # valid JSON of any type
    st.dictionaries(st.sampled_from(["text", "input", "output", "prompt", "completion", "tokens", "tags", "label",
                                     "text_pair", "messages", "source", "target"]), JSON, max_size=3)
    .map(lambda v: json.dumps(v).encode()),                                # the known fields with wrong types
    st.integers(1, 30000).map(lambda n: b"[" * n + b"]" * n),              # nested past the recursion limit
    st.integers(1, 30000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.just(b'{"text": "' + b"x" * 200_000 + b'"}'),                      # a huge line
)
FILES = st.lists(LINES, max_size=5).map(lambda lines: b"\n".join(lines))
DEEP = b"[" * 100_000 + b"]" * 100_000


def _write(data: bytes, suffix: str) -> str:
    fd, path = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _outcome(fn, path, error):
    """fn(path)'s result, or None after checking that its error is `error` and names the file."""
    try:
        return fn(path)
    except error as exc:
        assert str(exc).startswith(path), f"the message does not start with the file: {exc}"
        assert "\n" not in str(exc), f"more than one line: {exc!r}"
        return None
    finally:
        os.remove(path)


READERS = {
    "jsonl": (".jsonl", read_records),
    "txt": (".txt", read_records),
    "conll": (".conll", encoder_data.read_conll),
    "token-jsonl": (".jsonl", encoder_data.read_token_jsonl),
    "sequence": (".jsonl", encoder_data.read_sequence_examples),
    "masked-lm": (".jsonl", encoder_data.read_texts),
}


@pytest.mark.parametrize("reader", list(READERS))
def test_data_readers_give_records_or_one_line_naming_file_and_line(reader):
    suffix, fn = READERS[reader]

    @settings(max_examples=examples(60))
    @given(data=FILES)
    @example(data=b"\xff\xfe{\x00}\x00")                  # UTF-16 with its byte-order mark
    @example(data=b'{"text": "caf\xe9"}')                 # latin-1 inside JSON
    @example(data=DEEP)                                   # nested JSON past Python's recursion limit
    @example(data=b"token\n\xff B-PER\n")                 # CoNLL with a bad byte on line 2
    def run(data):
        out = _outcome(fn, _write(data, suffix), DataError)
        assert out is None or isinstance(out, list)
    run()


def test_a_bad_byte_names_its_line():
    path = _write(b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ".jsonl")
    with pytest.raises(DataError, match=r":2: not UTF-8 text"):
        read_records(path)
    os.remove(path)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_files_give_a_config_or_one_line_naming_the_file(suffix):
    @settings(max_examples=examples(60))
    @given(data=st.one_of(FILES, JSON.map(lambda v: json.dumps(v).encode()),
                          st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(TrainConfig)]), JSON,
                                          max_size=4).map(lambda v: json.dumps(v).encode())))
    @example(data=DEEP)
    @example(data=b"a: [" * 5000)
    @example(data=b"\xff\xfe\x00")
    @example(data=b"1: 2\n")                               # a key that is not a string
    def run(data):
        values = _outcome(load_config_file, _write(data, suffix), ConfigError)
        assert values is None or isinstance(values, dict)
        if values is not None:
            try:
                TrainConfig.from_dict(values)
            except ConfigError as exc:  # the values' problems name the key (the CLI prefixes the command)
                assert "\n" not in str(exc)
    run()


def test_flag_values_give_a_config_or_a_config_error():
    """Every TrainConfig key set from a flag (a string, as argparse hands it over) or a YAML value of any type:
    a config or one ConfigError naming the key; never a TypeError or ValueError from deeper down."""
    keys = [f.name for f in dataclasses.fields(TrainConfig)]

    @settings(max_examples=examples(200))
    @given(values=st.dictionaries(st.sampled_from(keys), st.one_of(st.text(max_size=12), JSON), min_size=1,
                                  max_size=3))
    @example(values={"max_steps": "²"})                   # str.isdigit() is True, int() refuses it
    @example(values={"learning_rate": "nan"})
    @example(values={"lora_r": "-0"})
    def run(values):
        try:
            TrainConfig.from_dict(values)
        except ConfigError as exc:
            assert "\n" not in str(exc).strip(), str(exc)
    run()


@pytest.mark.parametrize("case", ["non-utf8-data", "deep-json-data", "utf16-config", "deep-yaml-config",
                                  "unicode-digit-flag"])
def test_the_cli_stops_with_one_line_and_writes_nothing(case, tmp_path, capsys):
    """The cases the fuzzing found, end to end through `fastnlg train`: exit status 2, one line naming the file
    and line (or the key), no traceback, and no output directory."""
    from fastnlg.cli import main

    data = tmp_path / "train.jsonl"
    data.write_bytes({"non-utf8-data": b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
                      "deep-json-data": b'{"text": "ok"}\n' + DEEP + b"\n"}.get(case, b'{"text": "a b c"}\n'))
    config = tmp_path / "run.yaml"
    config.write_bytes({"utf16-config": "max_steps: 2\n".encode("utf-16"),
                        "deep-yaml-config": b"a: " + b"[" * 5000}.get(case, b"max_steps: 2\n"))
    out = tmp_path / "out"
    argv = ["train", "--model", "llama-tiny", "--train-files", str(data), "--config", str(config), "--output-dir",
            str(out), "--progress", "false"] + (["--max-steps", "²"] if case == "unicode-digit-flag" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastnlg train: error: ") and "\n" not in err and "Traceback" not in err, err
    where = {"non-utf8-data": f"{data}:2: not UTF-8", "deep-json-data": f"{data}:2: JSON nested too deeply",
             "utf16-config": f"{config}:1: not UTF-8", "deep-yaml-config": f"{config}: ",
             "unicode-digit-flag": "'max_steps' must be int"}[case]
    assert where in err, err
    assert not out.exists()
