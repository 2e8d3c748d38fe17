"""The design documents' `train_model` API: token lists in, trained model out."""

import math

import torch

from pipeline.model import GPTOSS, get_preset
from pipeline.train.single_process import evaluate_loss, train_model


def test_train_model_learns_a_repeating_sequence(capsys):
    torch.manual_seed(0)
    model = GPTOSS(get_preset("debug", vocab_size=64))
    tokens = (torch.arange(3000) % 37).tolist()
    val = torch.tensor(tokens[:33 * 8]).unfold(0, 33, 32)[:8]
    before = evaluate_loss(model, val, 4)
    trained = train_model(model, tokens, tokens[:600], seq_len=32, batch_size=8, num_epochs=2, learning_rate=3e-3)
    assert trained is model
    after = evaluate_loss(model, val, 4)
    assert after < before / 3, (before, after)
    out = capsys.readouterr().out
    assert "epoch 2/2" in out and "val ppl" in out
    ppl = float(out.strip().splitlines()[-1].split("val ppl ")[1])
    assert math.isfinite(ppl) and ppl < math.exp(before)



def test_the_earlier_module_name_is_the_same_module():
    import pipeline.train.simple as simple
    import pipeline.train.single_process as single_process

    assert simple is single_process and simple.train_model is train_model
