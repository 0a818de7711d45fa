"""q3r inside the Hugging Face Trainer: AdamQ3R, or Q3R attached to AdamW, trains and resumes
from the Trainer's own checkpoints bit for bit (tiny random BERT, CPU)."""

import os
import warnings

import pytest
import torch

import q3r

transformers = pytest.importorskip("transformers", reason="transformers is installed by .ci/run")
pytest.importorskip("accelerate", reason="the Trainer needs accelerate (q3r's hf extra installs it)")

LINEARS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


class _Sentences(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 100, (48, 12), generator=g)
        self.labels = (self.ids[:, 0] > 50).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _model():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return transformers.BertForSequenceClassification(cfg)


def _adamq3r(model):
    targets = q3r.find_targets(model, LINEARS, target_rank=0.3)
    return q3r.AdamQ3R(q3r.param_groups(model, targets, lmbda=0.5, steps=3, weight_decay=0.01), lr=2e-3), None


def _adamw_attached(model):
    reg = q3r.Q3R(q3r.find_targets(model, LINEARS, target_rank=0.3), lmbda=0.5, steps=3)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    reg.attach(opt)
    return opt, reg


def _trainer(model, opt, out, accumulation, cls=None):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=8, per_device_train_batch_size=4, gradient_accumulation_steps=accumulation,
        save_strategy="steps", save_steps=5, logging_steps=100, report_to=[], use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    return (cls or transformers.Trainer)(model=model, args=args, train_dataset=_Sentences(), optimizers=(opt, None))


@pytest.mark.parametrize("make, accumulation", [(_adamq3r, 1), (_adamq3r, 2), (_adamw_attached, 2)],
                         ids=["AdamQ3R", "AdamQ3R-accumulation2", "attached"])
def test_trainer_resumes_q3r_from_its_own_checkpoint_bit_for_bit(tmp_path, make, accumulation):
    model = _model()
    opt, reg = make(model)
    _trainer(model, opt, tmp_path, accumulation).train()
    straight = {k: v.clone() for k, v in model.state_dict().items()}
    if reg is not None:
        assert reg.num_steps == 8  # (one per optimizer step, not per micro-batch)
    diagnostics = (reg or opt).diagnostics()
    ranks = [v for k, v in diagnostics.items() if k.endswith("/envelope_rank")]
    assert len(ranks) == 12 and all(0 < r < 32 for r in ranks)  # (Q3R refreshed: envelopes below full rank)

    # without the Q3R term the same run ends elsewhere (the comparison below can fail)
    plain = _model()
    _trainer(plain, torch.optim.AdamW(plain.parameters(), lr=2e-3, weight_decay=0.01), tmp_path / "plain",
             accumulation).train()
    assert any(not torch.equal(v, plain.state_dict()[k]) for k, v in straight.items())

    # step 5 is mid-period: its factors come from the refresh at step 4, carried in optimizer.pt
    resumed = _model()
    opt2, reg2 = make(resumed)
    _trainer(resumed, opt2, tmp_path, accumulation).train(resume_from_checkpoint=os.path.join(tmp_path, "checkpoint-5"))
    if reg2 is not None:
        assert reg2.num_steps == 8
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, straight[k]), k


def test_a_q3r_attached_from_on_train_begin_of_a_resumed_run_warns_that_its_state_was_dropped(tmp_path):
    """README: attached after the Trainer loaded optimizer.pt (a callback's on_train_begin), the
    Q3R's state in it is dropped and the resumed run restarts its refresh clock at step 0. That
    happened without a word; attach now warns there, and not in a run that starts afresh."""
    class AttachAtBegin(transformers.TrainerCallback):
        def __init__(self, reg):
            self.reg = reg

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            self.reg.attach(optimizer)  # (the Trainer's AcceleratedOptimizer: attached through the one it wraps)

    runs = []
    for resume in (None, os.path.join(tmp_path, "checkpoint-5")):
        model = _model()
        reg = q3r.Q3R(q3r.find_targets(model, LINEARS, target_rank=0.3), lmbda=0.5, steps=3)
        trainer = _trainer(model, torch.optim.AdamW(model.parameters(), lr=2e-3), tmp_path, 1)
        trainer.add_callback(AttachAtBegin(reg))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train(resume_from_checkpoint=resume)
        runs.append((reg.num_steps, [str(w.message) for w in caught if "Q3R.attach" in str(w.message)]))
    assert runs[0] == (8, [])
    steps, said = runs[1]
    assert steps == 3  # (counted from 0 at the resume: the carried step count 5 was dropped)
    assert len(said) == 1 and "dropped by that load" in said[0]


def test_a_penalty_only_q3r_carried_with_add_term_false_resumes_bit_for_bit(tmp_path):
    """A Q3R used through penalty() in compute_loss is in no checkpoint of the Trainer unless the
    optimizer carries it: attach(optimizer, add_term=False) does, adding no term of its own."""
    class WithPenalty(transformers.Trainer):
        def compute_loss(self, model, inputs, **kwargs):
            loss = super().compute_loss(model, inputs, **kwargs)
            return loss + self.reg.penalty() if model.training else loss

    def run(resume):
        model = _model()
        reg = q3r.Q3R(q3r.find_targets(model, LINEARS, target_rank=0.3), lmbda=0.5, steps=3)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
        reg.attach(opt, add_term=False)
        trainer = _trainer(model, opt, tmp_path, 1, cls=WithPenalty)
        trainer.reg = reg
        trainer.train(resume_from_checkpoint=resume)
        return model, reg

    straight, reg = run(None)
    assert reg.num_steps == 8
    resumed, reg2 = run(os.path.join(tmp_path, "checkpoint-5"))
    assert reg2.num_steps == 8  # (not carried: 3, the clock restarted at the resume)
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, straight.state_dict()[k]), k
