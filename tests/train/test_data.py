"""Data formats, loss masks, bad data named by file and line, packing boundaries."""
import json

import pytest
import torch
import transformers

from fastnlg.train import data
from fastnlg.train.data import IGNORE, DataError


@pytest.fixture(scope="module")
def tok(tiny):
    return transformers.AutoTokenizer.from_pretrained(tiny["model"])


def _write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return str(path)


def test_prompt_completion_loss_on_completion_only(tmp_path, tok):
    path = _write(tmp_path, [{"prompt": "Record: a", "completion": "Sunny in Oslo."}])
    (s,), fmt = data.load_samples(path, tok, 64)
    n_prompt = len(tok("Record: a")["input_ids"])
    assert fmt == "prompt_completion"
    assert s.labels[:n_prompt] == [IGNORE] * n_prompt and s.labels[n_prompt:] == s.ids[n_prompt:]
    assert s.ids[-1] == tok.eos_token_id


def test_data_to_text_renders_the_record(tmp_path, tok):
    path = _write(tmp_path, [{"input": {"city": "Oslo", "high": 3}, "output": "Cold in Oslo."}])
    record, where = data.read_records(path)[0]
    assert data.prompt_of(record, "data_to_text", where) == ("Record: city: Oslo | high: 3\nText:", "Cold in Oslo.")
    (s,), fmt = data.load_samples(path, tok, 64)
    assert fmt == "data_to_text" and tok.decode(s.ids).startswith("Record: city: Oslo | high: 3\nText: Cold")


def test_text_and_txt_files(tmp_path, tok):
    (a,), _ = data.load_samples(_write(tmp_path, [{"text": "Rain in Lima."}]), tok, 64)
    (b,), fmt = data.load_samples(_write(tmp_path, ["Rain in Lima."], name="d.txt"), tok, 64)
    assert fmt == "text" and a.ids == b.ids == a.labels


def test_chat_masks_all_but_assistant_turns(tmp_path, tok):
    tok = transformers.AutoTokenizer.from_pretrained(tok.name_or_path)
    tok.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    msgs = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "Sunny."},
            {"role": "user", "content": "wind?"}, {"role": "assistant", "content": "Calm."}]
    (s,), fmt = data.load_samples(_write(tmp_path, [{"messages": msgs}]), tok, 128)
    assert fmt == "chat"
    trained = tok.decode([i for i, lab in zip(s.ids, s.labels) if lab != IGNORE])
    assert trained == "<s>assistant: Sunny.</s><s>assistant: Calm.</s>"


@pytest.mark.parametrize("lines,match", [
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": '], r"d.jsonl:2: invalid JSON"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], r"d.jsonl:2: cannot tell the record format"),
    ([{"prompt": "a", "completion": 3}], r"d.jsonl:1: field 'completion' must be a string, got int"),
    ([{"prompt": "a", "completion": "  "}], r"d.jsonl:1: field 'completion' is empty"),
    ([{"text": "a"}, {"prompt": "a", "completion": "b"}], r"d.jsonl:2: a prompt_completion record in a text"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], r"d.jsonl:1: the chat has no assistant turn"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
     r"d.jsonl:1: chat records need a tokenizer with a chat template"),
    ([{"input": [], "output": "x"}], r"d.jsonl:1: field 'input' must be a non-empty object"),
    (["[1, 2]"], r"d.jsonl:1: expected a JSON object, got list"),
])
def test_bad_data_names_file_and_line(tmp_path, tok, lines, match):
    with pytest.raises(DataError, match=match):
        data.load_samples(_write(tmp_path, lines), tok, 64)


def test_empty_file_and_too_long(tmp_path, tok):
    with pytest.raises(DataError, match="empty file"):
        data.load_samples(_write(tmp_path, []), tok, 64)
    path = _write(tmp_path, [{"text": "a b c d e f g h i j k l m n o p"}])
    with pytest.raises(DataError, match=r"d.jsonl:1: \d+ tokens > max_length 4 \(truncation is off\)"):
        data.load_samples(path, tok, 4, truncate=False)
    (s,), _ = data.load_samples(path, tok, 4, truncate=True)
    assert len(s.ids) == 4


def test_split_is_seeded_and_disjoint(tok, tiny):
    samples, _ = data.load_samples(tiny["train"], tok, 96)
    tr, ev = data.split(samples, 0.1, seed=3)
    tr2, ev2 = data.split(samples, 0.1, seed=3)
    assert [s.where for s in ev] == [s.where for s in ev2] and len(ev) == round(0.1 * len(samples))
    assert not {s.where for s in tr} & {s.where for s in ev} and len(tr) + len(ev) == len(samples)


def test_packed_loss_equals_samples_alone(tok, tiny):
    """No attention across packed samples and no label across a boundary: the summed loss of a packed row
    equals the sum of each sample's loss run alone (eager attention, fp64)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"], attn_implementation="eager").double()
    samples, _ = data.load_samples(tiny["train"], tok, 96)
    samples = samples[:5]
    rows = data.pack(samples, 256, tok.pad_token_id)
    assert len(rows) < len(samples)
    packed = data.collate(rows, tok.pad_token_id)
    assert (packed["position_ids"][0, :len(samples[0].ids)] == torch.arange(len(samples[0].ids))).all()
    with torch.no_grad():
        total = model(**packed, num_items_in_batch=1, use_cache=False).loss  # a sum; no cache: Transformers
        # reads packed samples from position_ids only without a KV cache (a cache makes it one long sequence)
        alone = sum(model(**data.collate([r], tok.pad_token_id), num_items_in_batch=1).loss
                    for r in data.pad_rows(samples, tok.pad_token_id))
    torch.testing.assert_close(total, alone, rtol=1e-6, atol=0)  # HF computes the loss in fp32
    n_targets = sum(sum(lab != IGNORE for lab in s.labels[1:]) for s in samples)
    assert data.target_tokens(packed) == n_targets
