import pytest
import torch
from pydantic import ValidationError

from model.network.rnn import ModelConfig, build_model, count_parameters, select_states


def test_published_model_has_about_9_3m_parameters():
    n = count_parameters(build_model(ModelConfig(), vocab_size=128))
    # embedding 128*256 + five GRUs 3*(in*h + h*h + 2h) + head 256*128 + 128
    assert n == 9_321_600
    assert 9_200_000 <= n <= 9_400_000


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_forward_shapes_and_carried_state_match_one_pass(cell):
    torch.manual_seed(0)
    model = build_model(ModelConfig(cell=cell, embedding_dim=8, hidden_sizes=[16, 12], dropout=0.0), 10).eval()
    ids = torch.randint(0, 10, (3, 7))
    logits, states = model(ids)
    assert logits.shape == (3, 7, 10)
    assert len(states) == 2
    h = states[1][0] if cell == "lstm" else states[1]
    assert h.shape == (1, 3, 12)
    step_logits, carried = [], None
    for t in range(7):  # one character at a time, carrying the state
        out, carried = model(ids[:, t:t + 1], carried)
        step_logits.append(out)
    torch.testing.assert_close(torch.cat(step_logits, dim=1), logits, rtol=1e-5, atol=1e-6)


def test_select_states_picks_batch_rows():
    model = build_model(ModelConfig(cell="lstm", embedding_dim=4, hidden_sizes=[5], dropout=0.0), 6)
    _, states = model(torch.randint(0, 6, (3, 2)))
    picked = select_states(states, torch.tensor([2, 2, 0]))
    assert torch.equal(picked[0][1], states[0][1][:, [2, 2, 0]])


def test_config_reports_every_bad_field():
    with pytest.raises(ValidationError) as err:
        ModelConfig(cell="rnn", embedding_dim=0, hidden_sizes=[64, -1], dropout=1.0, layers=3)
    fields = {e["loc"][0] for e in err.value.errors()}
    assert fields == {"cell", "embedding_dim", "hidden_sizes", "dropout", "layers"}
    with pytest.raises(ValidationError):
        ModelConfig(hidden_sizes=[])
