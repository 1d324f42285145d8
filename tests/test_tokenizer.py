import pytest

from moxin.tokenizer import load_tokenizer, mistral_v1_model_file


def test_default_is_the_mistral_v1_sentencepiece_tokenizer():
    tok = load_tokenizer()
    assert len(tok) == 32000
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.encode("In the beginning God created", add_special_tokens=False) == [560, 272, 5398, 2499, 3859]


def test_round_trip_keeps_code_whitespace():
    tok = load_tokenizer()
    text = "def f(x):\n    return x  # two spaces\n\n\tdone"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_a_hugging_face_tokenizer_folder_can_be_configured(tmp_path):
    load_tokenizer().save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert len(tok) == 32000 and tok.eos_token_id == 2
    assert tok.encode("hello world", add_special_tokens=False) == load_tokenizer().encode(
        "hello world", add_special_tokens=False)


def test_the_model_file_ships_with_mistral_common():
    assert mistral_v1_model_file().endswith("tokenizer.model.v1")


def test_missing_tokenizer_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(str(tmp_path / "nope"))
