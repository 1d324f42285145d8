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


def test_empty_prompt_is_refused(model):
    with pytest.raises(ValueError, match="prompt"):
        generate(model, [[]], max_new_tokens=2)
