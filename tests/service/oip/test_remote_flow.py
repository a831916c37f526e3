"""``RemoteFlow``: a served model as a ``torch.distributions.Distribution``, against a real
server. Its log_prob and samples match the flow's own, seeded draws repeat, and as the
independence proposal of a Metropolis–Hastings chain on U1 the demo model ``u1`` (fit to U1) is
accepted most of the time, where a model fit to nothing is not."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import httpx
import pytest
import torch
from torch.distributions import constraints

import nfcore
from nfcore import targets
from service.client import Client
from service.remote import RemoteFlow, support_of
from tests.service.conftest import ROOT, Server, write_model
from tests.service.inference.test_constrained import COLUMNS, FLOW, MODEL


@pytest.fixture(scope="module")
def nf(server: Server) -> Iterator[Client]:
    # The demo model u1 (an NSF fit to U1 of Rezende & Mohamed) next to the tiny test models.
    target = server.models_dir / "u1"
    if not target.exists():
        shutil.copytree(ROOT / "models" / "u1", target)
    with server.client() as client:
        yield client


def test_log_prob_and_shapes(nf: Client, server: Server) -> None:
    q = RemoteFlow(nf, "tiny", dtype=torch.float64)
    assert isinstance(q, torch.distributions.Distribution)
    assert q.event_shape == torch.Size([2]) and q.batch_shape == torch.Size()
    assert q.support is constraints.real_vector
    x = torch.randn(3, 4, 2, dtype=torch.float64)
    lp = q.log_prob(x)
    assert lp.shape == (3, 4) and lp.dtype == torch.float64
    with torch.no_grad():
        expected = server.flows["tiny"].log_prob(x.reshape(-1, 2).float()).reshape(3, 4)
    torch.testing.assert_close(lp, expected.double(), rtol=1e-4, atol=1e-4)
    assert q.sample((5, 2)).shape == (5, 2, 2)
    assert q.sample().shape == (2,)
    with pytest.raises(ValueError, match="event_shape|events of shape"):
        q.log_prob(torch.zeros(4, 3))


def test_seeded_sample_and_log_prob(nf: Client, server: Server) -> None:
    q = RemoteFlow(nf, "tiny")
    x, log_q = q.sample_and_log_prob((100,), seed=7)
    again, _ = q.sample_and_log_prob((100,), seed=7)
    torch.testing.assert_close(x, again)
    torch.testing.assert_close(q.log_prob(x), log_q, rtol=1e-3, atol=1e-3)
    # A seeded distribution: reproducible runs, different draws per call.
    a, b = RemoteFlow(nf, "tiny", seed=1), RemoteFlow(nf, "tiny", seed=1)
    first, second = a.sample((10,)), a.sample((10,))
    assert not torch.equal(first, second)
    torch.testing.assert_close(b.sample((10,)), first)


def test_conditional_model(nf: Client, server: Server) -> None:
    q = RemoteFlow(nf, "cond", context=[0.3], dtype=torch.float64)
    x = q.sample((6,), seed=0)
    with torch.no_grad():
        expected = server.flows["cond"].log_prob(x.float(), torch.full((6, 1), 0.3))
    torch.testing.assert_close(q.log_prob(x), expected.double(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="conditional"):
        RemoteFlow(nf, "cond")
    with pytest.raises(ValueError, match="no version"):
        RemoteFlow(nf, "tiny", version=5)


def test_support_when_constrained() -> None:
    support = support_of({"mu": {}, "tau": {"lower": 0.0}, "w": {"constraint": "simplex",
                                                               "shape": [3]}}, 5)
    ok = torch.tensor([[1.0, 2.0, 0.2, 0.3, 0.5]])
    bad = torch.tensor([[1.0, -2.0, 0.2, 0.3, 0.5]])
    assert support.check(torch.cat([ok, bad])).tolist() == [True, False]
    assert support_of({"mu": {"shape": [2]}}, 2) is constraints.real_vector
    with pytest.raises(ValueError, match="entries"):
        support_of({"tau": {"lower": 0}}, 3)


def _independence_mh(proposal: RemoteFlow, log_p, steps: int, seed: int
                     ) -> tuple[float, torch.Tensor]:
    """Independence Metropolis-Hastings: the acceptance rate and the chain."""
    y, log_q = proposal.sample_and_log_prob((steps,), seed=seed)
    log_w = log_p(y) - log_q  # importance log-weights of the proposals
    uniform = torch.rand(steps, generator=torch.Generator().manual_seed(seed),
                         dtype=log_w.dtype)
    current, current_w, accepted = y[0], log_w[0], 0
    chain = []
    for i in range(1, steps):
        if torch.log(uniform[i]) < log_w[i] - current_w:
            current, current_w = y[i], log_w[i]
            accepted += 1
        chain.append(current)
    return accepted / (steps - 1), torch.stack(chain)


def test_independence_metropolis_hastings_on_u1(nf: Client) -> None:
    target = nfcore.targets.get("U1")

    def log_p(x: torch.Tensor) -> torch.Tensor:
        return target.log_prob(x.float()).double()

    good = RemoteFlow(nf, "u1", dtype=torch.float64)
    rate, chain = _independence_mh(good, log_p, 2000, seed=0)
    # q fits U1 (KL ~0.005 nats): almost every proposal is accepted, not all of them.
    assert 0.7 < rate < 1.0, rate
    # The chain is on U1's ring, |z| near 2, as the target's own samples are.
    radius = chain.norm(dim=-1)
    assert 1.5 < radius.median() < 2.5
    poor = RemoteFlow(nf, "tiny", dtype=torch.float64)  # random weights, not fit to U1
    poor_rate, _ = _independence_mh(poor, log_p, 2000, seed=0)
    assert poor_rate < rate - 0.2, (poor_rate, rate)


def test_constrained_model_over_oip_and_as_a_distribution(nf: Client, server: Server) -> None:
    """A model fit to a model-language target (mu real, sigma > 0, derived var and resid): OIP
    metadata gives its constrained columns, and RemoteFlow is a distribution over its parameter
    columns with sigma's bound as its support."""
    if not (server.models_dir / "posterior").exists():
        write_model(server.models_dir, "posterior", FLOW,
                    metadata={"target": json.dumps(targets.from_spec(MODEL).spec)})
    meta = httpx.get(server.url + "/v2/models/posterior").json()
    shapes = {t["name"]: t["shape"] for t in meta["inputs"] + meta["outputs"]}
    assert shapes["x"] == [-1, 2] and shapes["samples"] == [-1, len(COLUMNS)]
    q = RemoteFlow(nf, "posterior", dtype=torch.float64)
    assert q.event_shape == (2,) and q.columns == ["mu", "sigma"]
    x, log_q = q.sample_and_log_prob((200,), seed=0)
    assert (x[:, 1] > 0).all() and q.support.check(x).all()
    assert not q.support.check(torch.tensor([[0.0, -1.0]])).any()
    torch.testing.assert_close(q.log_prob(x), log_q, rtol=1e-3, atol=1e-3)
