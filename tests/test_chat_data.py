"""Chat data: template and loss mask, schema adapters, bad records, packing, step-token counts."""

import json

import numpy as np
import pytest

from moxin.chat import CHAT_TEMPLATE, render_conversation
from moxin.data.chat_data import (
    ChatDataConfig,
    ChatSourceConfig,
    ExampleArrays,
    PackedChatDataset,
    PreferenceDataModule,
    SFTDataModule,
    collate_pairs,
    epoch_order,
    pack_conversations,
    read_chat_source,
)
from moxin.data.conversations import Skip, conversation_of, preference_of, tokenize_conversation
from moxin.data.synthetic import instruction_records, preference_records
from moxin.losses import IGNORE_INDEX
from moxin.tokenizer import load_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! 12+3=15"},
    {"role": "user", "content": "Again"},
    {"role": "assistant", "content": "Sure."},
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _runs(mask):
    """(start, end) of each run of 1s."""
    runs, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_rendered_text_is_the_moxin_format(tok):
    text = tok.apply_chat_template(CONVERSATION, chat_template=CHAT_TEMPLATE, tokenize=False)
    assert text == ("<s><|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\nHello! 12+3=15</s>\n"
                    "<|user|>\nAgain\n<|assistant|>\nSure.</s>\n")


def test_loss_mask_token_by_token(tok):
    ids, mask = render_conversation(tok, CONVERSATION)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # no doubled BOS
    assert ids.count(tok.eos_token_id) == 2  # one per reply, none doubled
    # The trained runs are exactly each reply's tokens followed by its EOS, nothing else.
    runs = _runs(mask)
    assert len(runs) == 2
    for (start, end), reply in zip(runs, ["Hello! 12+3=15", "Sure."], strict=True):
        assert ids[end - 1] == tok.eos_token_id
        assert tok.decode(ids[start:end - 1]) == reply
        # The token before the reply is the newline closing "<|assistant|>\n".
        assert tok.decode(ids[:start]).endswith("<|assistant|>\n")
    # Every other token (system, user turns, the turn headers, the newline after EOS) is untrained.
    untrained = [i for i, m in enumerate(mask) if not m]
    assert tok.decode([ids[i] for i in untrained if i > 0]).count("<|user|>") == 2
    # As labels: position t predicts token t + 1, trained exactly where token t + 1 is masked in.
    example, truncated = tokenize_conversation(tok, CONVERSATION, max_tokens=4096, overflow="truncate")
    assert not truncated
    expected = [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)]
    assert example.labels.tolist() == expected and example.input_ids.tolist() == ids[:-1]


def test_template_without_generation_markers_is_refused(tok):
    import copy

    other = copy.deepcopy(tok)
    other.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="generation"):
        render_conversation(other, CONVERSATION)
    # Whitespace control in the markers is fine.
    other.chat_template = CHAT_TEMPLATE.replace("{% generation %}", "{%- generation -%}")
    assert render_conversation(other, CONVERSATION) == render_conversation(tok, CONVERSATION)


def test_literal_special_tokens_in_text_are_skipped(tok):
    """A literal "</s>" in a message would become a control token (and be trained as one)."""
    for content in ("a</s>b", "done</s>", "<s>start"):
        with pytest.raises(Skip, match="special_token_text"):
            tokenize_conversation(tok, [{"role": "user", "content": "Q"}, {"role": "assistant", "content": content}],
                                  4096, "truncate")


def test_schemas_tulu_infinity_and_auto():
    tulu = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    infinity = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                                  {"from": "gpt", "value": "A"}]}
    assert conversation_of(tulu) == tulu["messages"]
    assert conversation_of(infinity) == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                         {"role": "assistant", "content": "A"}]
    assert conversation_of(infinity, "conversations") == conversation_of(infinity)
    with pytest.raises(Skip, match="missing_field"):
        conversation_of(tulu, "conversations")


def test_preference_schemas():
    prompt = [{"role": "user", "content": "Q"}]
    tulu = {"chosen": [*prompt, {"role": "assistant", "content": "good"}],
            "rejected": [*prompt, {"role": "assistant", "content": "bad"}]}
    chosen, rejected = preference_of(tulu)
    assert chosen[:-1] == rejected[:-1] == prompt and chosen[-1]["content"] == "good"
    # A separate prompt with reply-only sides (strings or assistant message lists) gives the same pair.
    assert preference_of({"prompt": "Q", "chosen": "good", "rejected": "bad"}) == (chosen, rejected)
    assert preference_of({"prompt": "Q", "chosen": [{"role": "assistant", "content": "good"}],
                          "rejected": [{"from": "gpt", "value": "bad"}]}) == (chosen, rejected)


@pytest.mark.parametrize(("record", "reason"), [
    ({"messages": [{"role": "user", "content": "Q"}]}, "no_assistant_turn"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "  "}]}, "empty_content"),
    ({"messages": [{"role": "robot", "content": "Q"}, {"role": "assistant", "content": "A"}]}, "unknown_role"),
    ({"messages": "not a list"}, "not_a_list"),
    ({"messages": [{"role": "user"}]}, "bad_message"),
    ({"text": "no messages"}, "missing_field"),
])
def test_bad_conversations_are_named(record, reason):
    with pytest.raises(Skip) as skip:
        conversation_of(record)
    assert skip.value.reason == reason


@pytest.mark.parametrize(("record", "reason"), [
    ({"prompt": "Q", "chosen": "same", "rejected": " same "}, "identical_pair"),
    ({"chosen": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "b"}]}, "prompt_mismatch"),
    ({"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "Q"}]}, "no_assistant_turn"),
    ({"chosen": "a", "rejected": "b"}, "missing_field"),
])
def test_bad_preference_pairs_are_named(record, reason):
    with pytest.raises(Skip) as skip:
        preference_of(record)
    assert skip.value.reason == reason


def _jsonl(path, records, extra_lines=()):
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


def test_local_jsonl_in_both_schemas_with_bad_records_counted(tok, tmp_path):
    good = [{"messages": [{"role": "user", "content": f"Question {i}"}, {"role": "assistant", "content": f"A{i}"}]}
            for i in range(5)]
    good += [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    bad = [{"messages": [{"role": "user", "content": "only a question"}]},
           {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}]},
           {"messages": [{"role": "narrator", "content": "Q"}, {"role": "assistant", "content": "A"}]},
           {"messages": [{"role": "user", "content": "long " * 200}, {"role": "assistant", "content": "A"}]}]
    path = _jsonl(tmp_path / "chat.jsonl", good + bad, extra_lines=["{not json", "[1, 2]"])
    source = ChatSourceConfig(name="local", kind="jsonl", path=path)
    config = ChatDataConfig(sources=[source], seq_len=64, val_fraction=0.0, progress=False)
    arrays, stats = read_chat_source(source, config, tok)
    assert stats["kept"] == 6 and len(arrays["train"]["examples"]) == 6
    assert stats["skipped"] == {"no_assistant_turn": 1, "empty_content": 1, "unknown_role": 1, "too_long": 1,
                                "bad_json": 1, "not_an_object": 1}
    # The over-long conversation's reply lies past 64 tokens: truncating would leave nothing to train on.
    assert stats["truncated"] == 0


def test_overflow_truncate_keeps_the_start_and_drop_skips(tok):
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "word " * 100}]
    example, truncated = tokenize_conversation(tok, messages, max_tokens=30, overflow="truncate")
    ids, mask = render_conversation(tok, messages)
    assert truncated and example.input_ids.tolist() == ids[:29]
    assert example.labels.tolist() == [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(29)]
    with pytest.raises(Skip, match="too_long"):
        tokenize_conversation(tok, messages, max_tokens=30, overflow="drop")


def test_preference_mask_covers_only_the_final_reply(tok):
    chosen = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "first"},
              {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "second"}]
    example, _ = tokenize_conversation(tok, chosen, 4096, "truncate", last_reply_only=True)
    trained = [t for t in example.labels.tolist() if t != IGNORE_INDEX]
    assert tok.decode(trained) == "second</s>"


def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    examples = []
    for n in lengths:
        from moxin.data.conversations import TokenizedExample

        ids = rng.integers(3, 1000, size=n).astype(np.int32)
        labels = np.where(rng.random(n) < 0.5, ids, IGNORE_INDEX).astype(np.int32)
        labels[-1] = ids[-1]
        examples.append(TokenizedExample(ids, labels))
    return ExampleArrays.from_examples(examples)


def test_packing_keeps_each_conversation_whole_and_separate():
    examples = _examples([30, 5, 12, 20, 7, 31, 1, 16])
    packed = pack_conversations(examples, seq_len=32, pad_id=0)
    assert len(packed.input_ids) < len(examples)  # several conversations share rows
    seen = []
    for row in range(len(packed.input_ids)):
        segments = packed.segments[row]
        for segment in np.unique(segments):
            where = np.flatnonzero(segments == segment)
            assert (np.diff(where) == 1).all()  # contiguous
            ids, labels = packed.input_ids[row, where], packed.labels[row, where]
            match = [i for i in range(len(examples)) if np.array_equal(examples[i][0], ids)]
            if match:
                assert np.array_equal(examples[match[0]][1], labels)  # labels never cross conversations
                seen += match
            else:  # padding: never trained
                assert (labels == IGNORE_INDEX).all()
    assert sorted(seen) == list(range(len(examples)))
    assert packed.padding == packed.input_ids.size - examples.lengths().sum()
    unpacked = pack_conversations(examples, seq_len=32, pad_id=0, pack=False)
    assert len(unpacked.input_ids) == len(examples)


def test_step_tokens_cover_each_optimizer_step_across_ranks():
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    from moxin.data.datamodule import ResumeSampler

    packed = pack_conversations(_examples(list(range(3, 60))), seq_len=64, pad_id=0)
    dataset = PackedChatDataset(packed, epoch_order(len(packed.input_ids), 2, seed=0))
    micro, accumulate, world = 2, 2, 2
    dataset.fit_to_steps(micro * accumulate * world)
    # Each rank's share, as Lightning's distributed sampler splits our sampler's order.
    step_size = micro * accumulate * world
    resumed_at = 3  # a run resumed after 3 optimizer steps continues at position 3 x step_size
    per_rank = [list(DistributedSamplerWrapper(ResumeSampler(len(dataset), start=resumed_at * step_size),
                                               num_replicas=world, rank=r, shuffle=False)) for r in range(world)]
    steps = len(dataset) // step_size - resumed_at
    for step in range(steps):
        positions = []
        for rank in range(world):
            positions += per_rank[rank][step * micro * accumulate:(step + 1) * micro * accumulate]
        expected = sum(int((dataset[p]["labels"] != IGNORE_INDEX).sum()) for p in positions)
        assert all(float(dataset[p]["step_tokens"]) == expected for p in positions)


def test_sft_datamodule_from_synthetic_instructions(tmp_path):
    config = ChatDataConfig(sources=[ChatSourceConfig(name="s", kind="synthetic", path="instructions",
                                                      num_examples=200)],
                            seq_len=128, micro_batch_size=2, epochs=2, val_fraction=0.1, progress=False,
                            cache_dir=str(tmp_path / "cache"))
    dm = SFTDataModule(config)
    dm.setup()
    assert dm.summary["train_conversations"] + dm.summary["val_conversations"] == 200
    assert dm.summary["packing_efficiency"] > 0.8
    assert len(dm.train_dataset.full_order) == 2 * dm.summary["train_rows"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["segments"].shape == (2, 128)
    # The second setup reads the cache and gives the same rows.
    again = SFTDataModule(config)
    again.setup()
    assert again.source_stats["s"]["cached"] and np.array_equal(again.train_dataset.packed.input_ids,
                                                                dm.train_dataset.packed.input_ids)


def test_preference_batches_put_chosen_rows_first(tok):
    records = list(preference_records(30, seed=3))
    config = ChatDataConfig(sources=[ChatSourceConfig(name="p", kind="synthetic", path="preferences",
                                                      num_examples=30, seed=3)],
                            format="preference", seq_len=128, micro_batch_size=3, val_fraction=0.0,
                            progress=False)
    dm = PreferenceDataModule(config)
    dm.setup()
    batch = collate_pairs([dm.train_dataset[i] for i in range(3)], pad_id=dm.pad_id)
    assert batch["input_ids"].shape[0] == 6
    for i in range(3):
        pair = int(dm.train_dataset.order[i])
        chosen = [t for t in batch["labels"][i].tolist() if t != IGNORE_INDEX]
        rejected = [t for t in batch["labels"][3 + i].tolist() if t != IGNORE_INDEX]
        assert tok.decode(chosen) == records[pair]["chosen"][-1]["content"] + "</s>"
        assert tok.decode(rejected) == records[pair]["rejected"][-1]["content"] + "</s>"


def test_synthetic_data_is_seeded_and_well_formed():
    assert list(instruction_records(20, seed=1)) == list(instruction_records(20, seed=1))
    for record in preference_records(50, seed=2):
        chosen, rejected = preference_of(record)  # never identical, same prompt
        assert chosen[-1]["content"] != rejected[-1]["content"]
