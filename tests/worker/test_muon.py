"""MuLoCo's inner optimizer (geotrain.worker.optim.MuonAdamW): torch's Muon on hidden matrices, AdamW
on the rest, stepped as one, with a standard state_dict that resumes exactly."""

import copy

import torch
import torch.nn as nn

from geotrain.worker.optim import MuonAdamW, muon_eligible


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.hidden = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 16)

    def forward(self, x):
        return self.lm_head(torch.relu(self.hidden(self.emb(x))))


def _loss(m, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 16, (32,), generator=g)
    return nn.functional.cross_entropy(m(x), torch.randint(0, 16, (32,), generator=g))


def test_which_parameters_get_muon():
    m = Net()
    got = {n for n, p in m.named_parameters() if muon_eligible(n, p)}
    assert got == {"hidden.weight"}


def test_steps_equal_torchs_muon_and_adamw_side_by_side():
    torch.manual_seed(0)
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    ours = MuonAdamW(a.named_parameters(), lr=1e-2, weight_decay=0.1)
    muon = torch.optim.Muon([b.hidden.weight], lr=1e-2, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([p for n, p in b.named_parameters() if n != "hidden.weight"], lr=1e-2, weight_decay=0.1)
    for step in range(3):
        for m, opts in ((a, [ours]), (b, [muon, adamw])):
            _loss(m, step).backward()
            for o in opts:
                o.step()
                o.zero_grad()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_a_wrong_optimizer_is_seen_to_differ():
    torch.manual_seed(0)
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    ours = MuonAdamW(a.named_parameters(), lr=1e-2)
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2)
    for m, o in ((a, ours), (b, plain)):
        _loss(m, 0).backward()
        o.step()
    assert not torch.equal(a.hidden.weight, b.hidden.weight)


def test_state_dict_resumes_exactly_and_the_step_hook_fires():
    torch.manual_seed(0)
    a = Net()
    opt = MuonAdamW(a.named_parameters(), lr=1e-2)
    fired = []
    opt.register_step_pre_hook(lambda o, args, kwargs: fired.append(1))
    for step in range(2):
        _loss(a, step).backward()
        opt.step()
        opt.zero_grad()
    assert fired == [1, 1]
    saved_model, saved_opt = copy.deepcopy(a.state_dict()), copy.deepcopy(opt.state_dict())
    assert sorted(saved_opt["state"]) == list(range(len(list(a.parameters()))))
    _loss(a, 2).backward()
    opt.step()
    expected = [p.clone() for p in a.parameters()]
    b = Net()
    b.load_state_dict(saved_model)
    opt_b = MuonAdamW(b.named_parameters(), lr=1e-2)
    opt_b.load_state_dict(saved_opt)
    _loss(b, 2).backward()
    opt_b.step()
    for p, q in zip(b.parameters(), expected):
        assert torch.equal(p, q)


def test_param_groups_reach_the_parts():
    opt = MuonAdamW(Net().named_parameters(), lr=1e-2)
    for g in opt.param_groups:
        g["lr"] = 5e-3
    assert opt.muon.param_groups[0]["lr"] == 5e-3 and opt.adamw.param_groups[0]["lr"] == 5e-3


def test_checkpoint_parts_round_trip_exactly():
    """Through the worker's checkpoint format (geotrain.worker.state), as a resumed run loads it."""
    import json

    from geotrain.worker.state import optimizer_from_parts, optimizer_to_parts

    torch.manual_seed(0)
    a = Net()
    opt = MuonAdamW(a.named_parameters(), lr=1e-2)
    _loss(a, 0).backward()
    opt.step()
    opt.zero_grad()
    tensors, meta = optimizer_to_parts(opt)
    tensors, meta = {k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(meta))
    b = Net()
    b.load_state_dict(a.state_dict())
    opt_b = MuonAdamW(b.named_parameters(), lr=1e-2)
    optimizer_from_parts(opt_b, tensors, meta)
    for m, o in ((a, opt), (b, opt_b)):
        _loss(m, 1).backward()
        o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
