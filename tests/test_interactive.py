"""task=generate and task=chat on a freshly trained tiny run; checkpoint loading."""

import pytest
import torch

from moxin.chat import CHAT_TEMPLATE, chat_prompt, chat_template_of
from moxin.checkpoint import load_model
from moxin.interactive import chat_task
from moxin.kernels import onednn_available
from moxin.tokenizer import load_tokenizer
from moxin.train import run


@pytest.fixture
def trained_run(make_cfg, tmp_path):
    run(make_cfg("+experiment=tiny_debug", "phase.max_steps=2", "phase.validate_before_training=false",
                 run_name="trained"))
    return tmp_path / "trained"


def test_a_run_folder_a_hf_folder_and_a_ckpt_load_the_same_weights(trained_run):
    from_run = load_model(str(trained_run)).state_dict()
    from_hf = load_model(str(trained_run / "final")).state_dict()
    from_ckpt = load_model(str(trained_run / "checkpoints" / "last.ckpt")).state_dict()
    for name in from_run:
        torch.testing.assert_close(from_hf[name], from_run[name])
        torch.testing.assert_close(from_ckpt[name], from_run[name])


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(str(tmp_path / "nowhere"))


def test_generate_task_streams_the_continuation(make_cfg, trained_run, capsys):
    result = run(make_cfg("task=generate", f"ckpt={trained_run}", "prompt=And God said",
                          "generation.max_new_tokens=12", "generation.temperature=0"))
    printed = capsys.readouterr().out
    assert result["text"].startswith("And God said")
    assert 1 <= result["new_tokens"] <= 12
    assert result["text"] in printed  # the streamed text is the returned text
    with pytest.raises(ValueError, match="prompt"):
        run(make_cfg("task=generate", f"ckpt={trained_run}"))
    with pytest.raises(ValueError, match="ckpt"):
        run(make_cfg("task=generate", "prompt=hello"))


def test_chat_task_keeps_the_conversation(make_cfg, trained_run, monkeypatch, capsys):
    import moxin.interactive

    prompts = []
    real = moxin.interactive.chat_prompt
    def recording_prompt(tokenizer, messages):
        prompts.append(list(messages))
        return real(tokenizer, messages)

    monkeypatch.setattr(moxin.interactive, "chat_prompt", recording_prompt)
    lines = iter(["Who made the heaven?", "And the earth?", ""])
    cfg = make_cfg("task=chat", f"ckpt={trained_run}", "generation.max_new_tokens=5", "generation.system=Be brief.")
    result = chat_task(cfg, read=lambda _: next(lines))
    assert result["turns"] == 2
    assert [m["role"] for m in result["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    # The second turn's prompt holds the whole first exchange.
    assert prompts[1][:3] == result["messages"][:3]
    assert "assistant> " in capsys.readouterr().out
    # Each prompt ends by opening the assistant's turn; each reply was cut at EOS.
    assert all(tok.decode(chat_prompt(tok, p)).endswith("<|assistant|>\n") for p in prompts
               for tok in [load_tokenizer()])


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")
def test_chat_packs_the_weights_once_for_the_whole_conversation(make_cfg, trained_run, monkeypatch):
    from moxin import kernels

    packs = []
    real = kernels.pack_weight
    monkeypatch.setattr(kernels, "pack_weight", lambda w: packs.append(w) or real(w))
    lines = iter(["Who made the heaven?", "And the earth?", ""])
    cfg = make_cfg("task=chat", f"ckpt={trained_run}", "generation.max_new_tokens=32", "hardware.onednn_linears=true")
    before = kernels.onednn_enabled()
    try:
        assert chat_task(cfg, read=lambda _: next(lines))["turns"] == 2
    finally:
        kernels.use_onednn_on_cpu(before)
    n_layers = cfg.model.n_layers
    assert len(packs) == 4 * n_layers + 1  # each product's weight once, not once per turn


def test_chat_template_is_the_tulu_format():
    tokenizer = load_tokenizer()
    assert chat_template_of(tokenizer) == CHAT_TEMPLATE and not tokenizer.chat_template  # not modified
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    text = tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True)
    assert text == ("<s><|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!</s>\n"
                    "<|user|>\nBye\n<|assistant|>\n")
    ids = chat_prompt(tokenizer, messages)
    assert ids[0] == 1 and ids.count(1) == 1  # one BOS
    assert ids.count(2) == 1  # one EOS: after the finished assistant turn
