"""Chat fine-tuning data: token ids and loss masks turn by turn, truncation by whole turns, bad input, batches."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest

from lmforge.config import TokenizerConfig
from lmforge.data.chat import CHAT_TEMPLATE, IM_END, IM_START, render_chat
from lmforge.data.sources import DataError
from lmforge.data.tokenizer import train_tokenizer
from lmforge.finetune.chat import encode_all, encode_conversation, read_conversations
from lmforge.finetune.data import IGNORE, ChatLoader, save_examples
from lmforge.finetune.evaluate import load_chat_task

# A character tokenizer: one id per character, so every position below can be counted by hand.
MESSAGES = [
    {"role": "system", "content": "S"},  # <s> system\nS <e> \n           = 1 + 8 + 1 + 1 = 11 tokens
    {"role": "user", "content": "Hi"},  # <s> user\nHi <e> \n             = 1 + 7 + 1 + 1 = 10
    {"role": "assistant", "content": "Yo"},  # <s> assistant\n Yo <e> \n  = 1 + 10 + 2 + 1 + 1 = 15
    {"role": "user", "content": "Q"},  # <s> user\nQ <e> \n               = 9
    {"role": "assistant", "content": "Ok"},  # 15
]
FIRST_ASSISTANT, SECOND_ASSISTANT = 21, 45  # where the two assistant turns start


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TokenizerConfig(kind="char"), ["system user assistant\nSHiYoQOk abc"])


def test_mask_falls_on_assistant_content_and_end_of_turn(tok):
    ex = encode_conversation(tok, MESSAGES)
    assert len(ex.ids) == len(ex.mask) == 60 and not ex.truncated
    trained = [i for i, m in enumerate(ex.mask) if m]
    # 1 (<|im_start|>) + 10 ("assistant\n") into each assistant turn: its two characters, then <|im_end|>.
    assert trained == [32, 33, 34, 56, 57, 58]
    end = tok.token_to_id(IM_END)
    assert [ex.ids[i] for i in trained] == [*tok.encode("Yo"), end, *tok.encode("Ok"), end]
    assert ex.ids[FIRST_ASSISTANT] == ex.ids[SECOND_ASSISTANT] == tok.token_to_id(IM_START)
    last = encode_conversation(tok, MESSAGES, loss_on="last_assistant")
    assert [i for i, m in enumerate(last.mask) if m] == [56, 57, 58] and last.ids == ex.ids


def test_ids_are_the_jinja_template_and_the_serving_prompt(tok):
    ex = encode_conversation(tok, MESSAGES)
    rendered = jinja2.Template(CHAT_TEMPLATE).render(messages=MESSAGES, add_generation_prompt=False)
    assert tok.decode(ex.ids) == rendered
    # What the model sees before each reply is exactly what the server feeds it.
    for start, k in ((FIRST_ASSISTANT, 2), (SECOND_ASSISTANT, 4)):
        assert ex.ids[: start + 11] == render_chat(tok, MESSAGES[:k], add_generation_prompt=True)


def test_content_spelling_a_special_token_stays_text(tok):
    ex = encode_conversation(tok, [{"role": "user", "content": "<|im_end|>"}, {"role": "assistant", "content": "Ok"}])
    assert ex.ids.count(tok.token_to_id(IM_END)) == 2  # the two real turn ends, not the user's text


def test_truncation_keeps_whole_turns(tok):
    exact = encode_conversation(tok, MESSAGES, max_length=36)  # system + first exchange = 36 tokens
    assert len(exact.ids) == 36 and exact.truncated and sum(exact.mask) == 3
    # Room for the next user turn but not its reply: the kept part still ends at the first assistant turn.
    assert encode_conversation(tok, MESSAGES, max_length=50).ids == exact.ids
    assert encode_conversation(tok, MESSAGES, max_length=60).truncated is False
    assert encode_conversation(tok, MESSAGES, max_length=35) == "first exchange longer than max_length"
    from lmforge.finetune.chat import Conversation

    examples, stats = encode_all(tok, [Conversation(MESSAGES, "a:1"), Conversation(MESSAGES[:3], "a:2")], 20)
    assert examples == [] and stats["dropped"] == {"first exchange longer than max_length": 2}
    examples, stats = encode_all(tok, [Conversation(MESSAGES, "a:1"), Conversation(MESSAGES[:3], "a:2")], 40)
    assert stats["kept"] == 2 and stats["truncated"] == 1 and stats["target_tokens"] == 6


BAD_LINES = {
    "malformed JSON": ('{"messages": [', "not valid JSON"),
    "unknown role": ('{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
                     "messages[0].role is 'bot'"),
    "no assistant turn": ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    "empty content": ('{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]}',
                      "messages[0].content is empty"),
    "missing content": ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}',
                        "messages[0].content is missing"),
    "no messages": ('{"text": "hello"}', "'messages' list"),
}
GOOD = json.dumps({"messages": MESSAGES})


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_stops_with_file_and_line(tmp_path, case):
    line, expected = BAD_LINES[case]
    path = tmp_path / "chat.jsonl"
    path.write_text(f"{GOOD}\n\n{line}\n{GOOD}\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_conversations([path], on_bad_line="stop")
    assert str(e.value).startswith(f"{path}:3: ") and expected in str(e.value)


def test_bad_lines_skipped_are_counted(tmp_path):
    path = tmp_path / "chat.jsonl"
    bad = [BAD_LINES[k][0] for k in sorted(BAD_LINES)]
    path.write_text("\n".join([GOOD, *bad, GOOD, BAD_LINES["unknown role"][0]]) + "\n", encoding="utf-8")
    convs, report = read_conversations([path], on_bad_line="skip")
    assert [c.where for c in convs] == [f"{path}:1", f"{path}:8"]
    assert report.lines == 9 and report.kept == 2
    assert dict(report.skipped) == {"malformed JSON": 1, "unknown role": 2, "no assistant turn": 1,
                                    "empty content": 2, "no messages": 1}
    assert report.examples["unknown role"] == [f"{path}:7", f"{path}:9"]


def test_chat_loader_pads_right_and_masks_targets(tok, tmp_path):
    a = encode_conversation(tok, MESSAGES)
    b = encode_conversation(tok, MESSAGES[1:3])
    save_examples([a, b], tmp_path / "chat_train.npz")
    loader = ChatLoader(tmp_path, "train", batch_size=2, context=64, seed=0, pad_id=tok.pad_id)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (2, 59)
    for row in range(2):
        ex = a if int((x[row] != tok.pad_id).sum()) == 59 else b
        n = len(ex.ids) - 1
        assert x[row, :n].tolist() == ex.ids[:-1] and (x[row, n:] == tok.pad_id).all()
        expected = [ex.ids[t + 1] if ex.mask[t + 1] else IGNORE for t in range(n)]
        assert y[row, :n].tolist() == expected and (y[row, n:] == IGNORE).all()
    # Resuming from a saved position gives the batches that would have come.
    state = loader.state_dict()
    following = [loader.next_batch() for _ in range(3)]
    again = ChatLoader(tmp_path, "train", batch_size=2, context=64, seed=0, pad_id=tok.pad_id)
    again.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(following, [again.next_batch() for _ in range(3)], strict=True):
        assert x1.equal(x2) and y1.equal(y2)
    with pytest.raises(DataError, match="longer|more than"):
        ChatLoader(tmp_path, "train", batch_size=2, context=30, seed=0)


def test_embedded_set_is_valid_and_heldout_lines_are_unseen():
    from lmforge.finetune.setup import EMBEDDED_DIR, EMBEDDED_TASK, EMBEDDED_TRAIN, EMBEDDED_VAL

    train, report = read_conversations([EMBEDDED_DIR / EMBEDDED_TRAIN, EMBEDDED_DIR / EMBEDDED_VAL])
    assert report.kept == report.lines == 1300 and not report.skipped
    task = load_chat_task(EMBEDDED_DIR / EMBEDDED_TASK)
    assert len(task) == 200 and all(len(it["choices"]) == 4 for it in task)
    seen = {m["content"] for c in train for m in c.messages if m["role"] == "user"}
    assert not seen & {it["messages"][0]["content"] for it in task}
    assert sum(Path(EMBEDDED_DIR / f).stat().st_size for f in (EMBEDDED_TRAIN, EMBEDDED_VAL, EMBEDDED_TASK)) < 500_000
