import pytest
import torch

from model.generation.sampling import generate, generate_refeed
from model.network.rnn import ModelConfig, build_model
from model.data.vocab import build_vocab, count_chars

PROMPT = "Mmm, donuts"


@pytest.fixture
def vocab():
    return build_vocab(count_chars(["Mmm, donuts. D'oh! Woo-hoo! Why you little...!"]))


@pytest.fixture(params=["gru", "lstm"])
def model(request, vocab):
    torch.manual_seed(0)
    m = build_model(ModelConfig(cell=request.param, embedding_dim=16, hidden_sizes=[32, 24], dropout=0.5), vocab.size)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4)  # sharper distributions than at init, so greedy choices are clear-cut
    return m


def _log_prob(model, vocab, text: str, prompt: str) -> float:
    """Sum of log-probabilities of text's characters after the prompt."""
    ids = torch.from_numpy(vocab.encode(text).astype("int64"))[None]  # (1, L)
    with torch.no_grad():
        logp = model.eval()(ids[:, :-1])[0].log_softmax(-1)[0]  # (L - 1, V)
    targets = ids[0, 1:]
    return logp[torch.arange(len(targets)), targets][len(prompt) - 1:].sum().item()


def test_batch_of_samples_has_the_asked_shape(model, vocab):
    texts = generate(model, vocab, prompt=PROMPT, length=25, num_samples=3, seed=1)
    assert len(texts) == 3 and all(t.startswith(PROMPT) and len(t) == len(PROMPT) + 25 for t in texts)
    assert len(set(texts)) > 1
    assert model.training  # the caller's mode is restored


def test_sampling_is_reproducible_by_seed(model, vocab):
    a = generate(model, vocab, prompt=PROMPT, length=40, num_samples=2, seed=7, top_k=5, top_p=0.95, temperature=0.8)
    assert a == generate(model, vocab, prompt=PROMPT, length=40, num_samples=2, seed=7, top_k=5, top_p=0.95, temperature=0.8)
    assert a != generate(model, vocab, prompt=PROMPT, length=40, num_samples=2, seed=8, top_k=5, top_p=0.95, temperature=0.8)


def test_greedy_is_deterministic_and_equals_its_limits(model, vocab):
    greedy = generate(model, vocab, prompt=PROMPT, length=30, greedy=True, seed=1)
    assert greedy == generate(model, vocab, prompt=PROMPT, length=30, greedy=True, seed=2)
    assert greedy == generate(model, vocab, prompt=PROMPT, length=30, top_k=1, seed=3)
    assert greedy == generate(model, vocab, prompt=PROMPT, length=30, top_p=1e-6, seed=4)
    assert greedy == generate(model, vocab, prompt=PROMPT, length=30, temperature=0, seed=5)
    assert greedy == generate(model, vocab, prompt=PROMPT, length=30, beam_width=1)


def test_carried_state_equals_refeeding_the_whole_history(model, vocab):
    carried = generate(model, vocab, prompt=PROMPT, length=30, greedy=True)
    assert carried == generate_refeed(model, vocab, prompt=PROMPT, length=30, window=None, greedy=True)
    sampled = generate(model, vocab, prompt=PROMPT, length=30, num_samples=2, seed=3)
    assert sampled == generate_refeed(model, vocab, prompt=PROMPT, length=30, window=None, num_samples=2, seed=3)


def test_unknown_token_is_never_produced(model, vocab):
    with torch.no_grad():
        model.head.bias[vocab.unk_id] = 1e4  # the model would choose it every time
    texts = generate(model, vocab, prompt=PROMPT, length=50, num_samples=4, temperature=2.0)
    texts += generate(model, vocab, prompt=PROMPT, length=20, greedy=True)
    texts += generate(model, vocab, prompt=PROMPT, length=20, beam_width=3, num_samples=3)
    assert all(vocab.unk_token not in t for t in texts)


def test_prompt_outside_the_vocabulary_warns_and_generates(model, vocab):
    with pytest.warns(UserWarning, match="not in the vocabulary.*'Zz'"):
        (text,) = generate(model, vocab, prompt="Zzz donuts", length=10)
    assert text.startswith("Zzz donuts") and len(text) == 20


def test_beam_search_returns_asked_length_and_beats_greedy(model, vocab):
    beams = generate(model, vocab, prompt=PROMPT, length=20, beam_width=6, num_samples=3)
    assert len(beams) == 3 and all(len(b) == len(PROMPT) + 20 for b in beams)
    scores = [_log_prob(model, vocab, b, PROMPT) for b in beams]
    assert scores == sorted(scores, reverse=True)
    (greedy,) = generate(model, vocab, prompt=PROMPT, length=20, greedy=True)
    assert scores[0] >= _log_prob(model, vocab, greedy, PROMPT) - 1e-4


def test_empty_prompt_and_edge_cases(model, vocab):
    assert [len(t) for t in generate(model, vocab, length=15, num_samples=2)] == [15, 15]
    assert len(generate(model, vocab, length=15, beam_width=2)[0]) == 15
    assert generate(model, vocab, prompt=PROMPT, length=0) == [PROMPT]
    with pytest.raises(ValueError, match=r"top_p must be in .*; beam_width \(99\) must be below the vocabulary size"):
        generate(model, vocab, prompt=PROMPT, top_p=0, beam_width=99)
