import pytest
import torch

from moxin.generate import generate, sample_next
from moxin.model import ModelConfig, Transformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                      hidden_dim=64, sliding_window=6, max_seq_len=64)
    return Transformer(cfg).eval()


def test_greedy_matches_step_by_step_argmax(model):
    prompt = [1, 5, 9]
    out = generate(model, [prompt], max_new_tokens=12)
    sequence = list(prompt)
    for _ in range(12):  # sequence longer than the window of 6
        with torch.no_grad():
            sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
    assert out.tokens[0] == sequence[3:]


def test_logprobs_are_those_of_the_raw_logits(model):
    out = generate(model, [[1, 2]], max_new_tokens=3, temperature=0.7, seed=3)
    sequence = [1, 2] + out.tokens[0]
    with torch.no_grad():
        logp = model(torch.tensor([sequence])).log_softmax(-1)[0]
    expected = [float(logp[1 + i, tok]) for i, tok in enumerate(out.tokens[0])]
    assert out.logprobs[0] == pytest.approx(expected, abs=1e-5)


def test_seeded_sampling_is_reproducible(model):
    a = generate(model, [[1, 4], [1, 7, 7]], max_new_tokens=8, temperature=1.0, seed=11)
    b = generate(model, [[1, 4], [1, 7, 7]], max_new_tokens=8, temperature=1.0, seed=11)
    c = generate(model, [[1, 4], [1, 7, 7]], max_new_tokens=8, temperature=1.0, seed=12)
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_stop_token_ends_generation(model):
    free = generate(model, [[1, 3]], max_new_tokens=10)
    stop_at = free.tokens[0][2]
    stopped = generate(model, [[1, 3]], max_new_tokens=10, stop=[stop_at])
    assert stopped.tokens[0] == free.tokens[0][: free.tokens[0].index(stop_at) + 1]


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 2.8]])
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 2, 1.0, gen)) for _ in range(200)}
    assert draws == {1, 2}
    # top_p 0.5: token 1 alone holds < 0.5, tokens 1 and 2 reach it, token 4 is cut.
    draws = {int(sample_next(logits, 1.0, 0, 0.5, gen)) for _ in range(200)}
    assert draws == {1, 2}
    assert int(sample_next(logits, 0.0, 0, 1.0, gen)) == 1


def test_top_p_keeps_the_most_likely_token_and_must_be_positive(model):
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 2.9]])
    assert {int(sample_next(logits, 1.0, 0, 1e-6, gen)) for _ in range(20)} == {1}
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1, 2]], max_new_tokens=2, temperature=1.0, top_p=0.0)


def test_model_mode_is_restored_even_when_generation_fails(model):
    model.train()
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1] * 60], max_new_tokens=10)
    assert model.training
    model.eval()


def test_empty_prompt_is_refused(model):
    with pytest.raises(ValueError, match="prompt"):
        generate(model, [[]], max_new_tokens=2)


def windowed_model(window=16, vocab=97, layers=2, max_seq_len=256):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, dim=32, n_layers=layers, n_heads=4, n_kv_heads=2, head_dim=8,
                      hidden_dim=64, sliding_window=window, max_seq_len=max_seq_len)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("prefill,chunk", [(1, 16), (20, 16), (70, 16), (70, 10), (45, 7)])
def test_rolling_buffer_logits_equal_full_forward_past_the_window(prefill, chunk):
    from moxin.generate import RollingKVCache

    model = windowed_model(window=16)
    sequence = torch.randint(0, 97, (1, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(sequence)  # (1, 100, V): whole sequence under the sliding-window mask
        cache = RollingKVCache(model.config, 1, 100, torch.zeros(1, dtype=torch.long), torch.float32, "cpu")
        assert cache.slots == 16
        # Chunks not aligned to the 16 slots wrap around the buffer in mid-prefill.
        cached = [model(sequence[:, s:min(s + chunk, prefill)], cache=cache) for s in range(0, prefill, chunk)]
        cached += [model(sequence[:, t:t + 1], cache=cache) for t in range(prefill, 100)]
    torch.testing.assert_close(torch.cat(cached, dim=1), full, atol=1e-4, rtol=1e-4)


def test_attention_spans_only_the_filled_slots_until_the_buffer_wraps():
    from moxin.generate import RollingKVCache

    model = windowed_model(window=16)
    cache = RollingKVCache(model.config, 1, 40, torch.zeros(1, dtype=torch.long), torch.float32, "cpu")
    spans = []
    for chunk in (5, 1, 1, 10, 1, 1):  # prefill, decode, decode, a chunk that wraps, decode, decode
        _, mask = cache.prepare(chunk)
        spans.append(mask.shape[-1])
        cache.advance(chunk)
    # A prefill chunk sees the filled slots and itself; a decode step the filled slots and its own.
    assert spans == [5, 6, 7, 7 + 10, 16, 16]


def test_mixed_length_batch_rows_equal_generating_each_alone():
    model = windowed_model(window=16)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (3, 17, 40)]
    batch = generate(model, prompts, max_new_tokens=30)
    for row, prompt in enumerate(prompts):
        alone = generate(model, [prompt], max_new_tokens=30)
        assert batch.tokens[row] == alone.tokens[0]
        assert batch.logprobs[row] == pytest.approx(alone.logprobs[0], abs=1e-4)


def test_sampled_batch_logprobs_equal_a_full_forward_pass():
    model = windowed_model(window=8)
    prompts = [[1, 5, 9, 11, 3], [1, 2]]
    out = generate(model, prompts, max_new_tokens=20, temperature=0.9, top_k=20, top_p=0.9, seed=5)
    for prompt, new, logps in zip(prompts, out.tokens, out.logprobs, strict=True):
        with torch.no_grad():
            full = model(torch.tensor([prompt + new])).log_softmax(-1)[0]
        expected = [float(full[len(prompt) - 1 + i, tok]) for i, tok in enumerate(new)]
        assert logps == pytest.approx(expected, abs=1e-4)


class CharTokenizer:
    """Token id i decodes to chr(97 + i % 26): enough to test stop strings."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + i % 26) for i in ids)


def test_stop_sequences_and_strings():
    model = windowed_model()
    free = generate(model, [[1, 3]], max_new_tokens=12).tokens[0]
    by_sequence = generate(model, [[1, 3]], max_new_tokens=12, stop=[free[4:6]]).tokens[0]
    assert by_sequence == free[:6]
    text = CharTokenizer().decode(free)
    by_string = generate(model, [[1, 3]], max_new_tokens=12, stop=[text[5:8]], tokenizer=CharTokenizer())
    assert by_string.tokens[0] == free[:8]
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, [[1, 3]], max_new_tokens=2, stop=["abc"])


def test_finished_rows_do_not_grow_while_others_continue():
    model = windowed_model()
    free = generate(model, [[1, 3], [1, 4, 4]], max_new_tokens=10).tokens
    stop = free[0][1]
    out = generate(model, [[1, 3], [1, 4, 4]], max_new_tokens=10, stop=[stop])
    assert out.tokens[0] == free[0][: free[0].index(stop) + 1]
    expected = free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1]
    assert out.tokens[1] == expected  # row 1 runs on until its own stop or the limit


def test_streaming_callback_sees_every_token_in_order():
    model = windowed_model()
    seen = []
    out = generate(model, [[1, 3], [1, 8]], max_new_tokens=7, callback=lambda row, tok: seen.append((row, tok)))
    for row in (0, 1):
        assert [t for r, t in seen if r == row] == out.tokens[row]


def test_cache_memory_is_bounded_by_the_window():
    from moxin.generate import RollingKVCache

    model = windowed_model(window=16, max_seq_len=1024)
    zero = torch.zeros(1, dtype=torch.long)
    sizes = [RollingKVCache(model.config, 1, n, zero, torch.float32, "cpu").nbytes for n in (16, 64, 256)]
    assert sizes[0] == sizes[1] == sizes[2] == 2 * 2 * 2 * 16 * 8 * 4  # k+v, layers, kv heads, W, D, fp32
    short = RollingKVCache(model.config, 1, 10, zero, torch.float32, "cpu")
    assert short.slots == 10  # never more slots than the sequence needs


def test_too_long_a_generation_is_refused():
    model = windowed_model(max_seq_len=32)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1] * 20], max_new_tokens=20)


def test_greedy_matches_transformers_generate(tmp_path):
    from transformers import AutoModelForCausalLM

    model = windowed_model(window=16, vocab=128, layers=3)
    model.save_hf(str(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (12, 5, 21)]
    ours = generate(model, prompts, max_new_tokens=40)
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    assert [row[longest:] for row in theirs.tolist()] == ours.tokens


@pytest.mark.parametrize("length,window,expected", [
    (4096, 4096, 603_979_776), (4096, None, 603_979_776),
    (32768, 4096, 603_979_776), (32768, None, 4_831_838_208),  # the README's table: 8x at 32K
])
def test_moxin_7b_cache_bytes_as_in_the_readme(length, window, expected):
    import dataclasses

    from moxin.generate import RollingKVCache

    cfg = dataclasses.replace(ModelConfig(), sliding_window=window)  # moxin_7b shapes
    cache = RollingKVCache(cfg, 1, length, torch.zeros(1, dtype=torch.long), torch.bfloat16, "meta")
    assert cache.nbytes == expected


def test_long_prompt_prefills_in_window_bounded_chunks(monkeypatch):
    from moxin.generate import RollingKVCache

    model = windowed_model(window=16, max_seq_len=4096)
    widest = []
    update = RollingKVCache.update

    def recording_update(self, layer, k, v):
        keys, values = update(self, layer, k, v)
        widest.append(keys.shape[2])
        return keys, values

    monkeypatch.setattr(RollingKVCache, "update", recording_update)
    prompt = torch.randint(0, 97, (2000,), generator=torch.Generator().manual_seed(4)).tolist()
    out = generate(model, [prompt], max_new_tokens=5)
    assert len(out.tokens[0]) == 5
    assert max(widest) <= 2 * 16  # a chunk of <= W queries sees <= W cached + W new keys, whatever the length
    with torch.no_grad():  # and the continuation is still that of the whole sequence
        expected = int(model(torch.tensor([prompt]))[0, -1].argmax())
    assert out.tokens[0][0] == expected


def test_sampling_follows_the_distribution_and_its_truncations():
    from moxin.generate import sample_next

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])).expand(40_000, 5)
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, 1.0, 0, 1.0, generator), minlength=5).float() / 40_000
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]), atol=0.01)  # never the 0-prob token
    top2 = torch.bincount(sample_next(logits, 1.0, 2, 1.0, generator), minlength=5).float() / 40_000
    assert top2[2:].sum() == 0 and abs(top2[0] - 0.625) < 0.01
    nucleus = torch.bincount(sample_next(logits, 1.0, 0, 0.7, generator), minlength=5)
    assert nucleus[2:].sum() == 0  # 0.5 + 0.3 reach top_p 0.7: the rest are dropped
