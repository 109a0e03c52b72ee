"""Pyro's own example patterns, run unchanged through fit and evaluate (round 2): an HMM under
``pyro.markov`` with enumerated states (scored exactly, by the forward algorithm), optimizers
whose rate is not ``lr``, per-point ``pyro.param`` guides, data laid out along another dimension,
and models that fail with a bare ``assert``."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDelta

import lvmkit
from conftest import assert_close

# -- an HMM as Pyro's examples/hmm.py writes it (model_1) -----------------------------------------

HIDDEN, TONES = 3, 4


def hmm_model(sequences, include_prior=True):
    """Discrete states enumerated under ``pyro.markov``; global transition and emission
    probabilities (point masses under AutoDelta); ``sequences`` shape (N, T, D), binary."""
    num_sequences, length, data_dim = sequences.shape
    with poutine.mask(mask=include_prior):
        probs_x = pyro.sample(
            "probs_x", dist.Dirichlet(0.9 * torch.eye(HIDDEN) + 0.1).to_event(1)
        )  # event (H, H)
        probs_y = pyro.sample(
            "probs_y", dist.Beta(0.1, 0.9).expand([HIDDEN, data_dim]).to_event(2)
        )  # event (H, D)
    tones = pyro.plate("tones", data_dim, dim=-1)
    with pyro.plate("sequences", num_sequences, dim=-2):
        x = 0
        for t in pyro.markov(range(length)):
            x = pyro.sample(
                f"x_{t}", dist.Categorical(probs_x[x]), infer={"enumerate": "parallel"}
            )  # batch (N, 1) (enumerated)
            with tones:
                pyro.sample(
                    f"y_{t}", dist.Bernoulli(probs_y[x.squeeze(-1)]), obs=sequences[:, t]
                )  # batch (N, D)


def _forward(sequences, probs_x, probs_y):
    """log p(y_1:T | θ) of each sequence by the forward algorithm (x_0's predecessor is state 0,
    as in the model)."""
    out = []
    for seq in sequences:
        log_alpha = None
        for t in range(seq.shape[0]):
            emit = dist.Bernoulli(probs_y).log_prob(seq[t]).sum(-1)  # (H,)
            if log_alpha is None:
                log_alpha = probs_x[0].log() + emit
            else:
                log_alpha = torch.logsumexp(log_alpha[:, None] + probs_x.log(), dim=0) + emit
        out.append(torch.logsumexp(log_alpha, dim=0))
    return torch.stack(out)


def test_an_enumerated_markov_chain_is_scored_by_the_forward_algorithm():
    """pyro.markov reuses enumeration dims along the chain (x_t and x_{t+2} share one): summing
    every enumerated site in one joint over the shared dims scores only period-2 state paths
    (−75.56 against −62.77 on one sequence before the fix). The kernel contracts them as
    TraceEnum_ELBO does: exactly the forward algorithm."""
    torch.manual_seed(0)
    sequences = torch.bernoulli(torch.full((3, 7, TONES), 0.4))
    guide = AutoDelta(poutine.block(hmm_model, expose=["probs_x", "probs_y"]))
    result = lvmkit.fit(
        hmm_model, guide, sequences, epochs=3, batch_size=None, lr=0.05,
        objective=pyro.infer.TraceEnum_ELBO(max_plate_nesting=2), progress=False,
    )  # fmt: skip
    assert result.history.train_loss.notna().all()
    theta = guide.median(sequences)
    exact = _forward(sequences, theta["probs_x"].detach(), theta["probs_y"].detach())
    scores = lvmkit.evaluate(hmm_model, guide, sequences, num_samples=4)
    assert scores.attrs["likelihood"].startswith("log p(x | θ")
    assert_close(scores.log_likelihood.to_numpy().copy(), exact.numpy(), atol=1e-4)
    # and Pyro's own TraceEnum_ELBO agrees (the same contraction, summed over the sequences)
    elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=2)
    loss = elbo.loss(hmm_model, guide, sequences, include_prior=False)
    assert_close(-loss, float(exact.sum()), atol=1e-3)


# -- an optimizer without a learning rate ---------------------------------------------------------


class _SignDescent(torch.optim.Optimizer):
    """Steps of a fixed size against the gradient's sign: an optimizer with no ``lr`` at all."""

    def __init__(self, params, size=0.01):
        super().__init__(params, {"size": size})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(group["size"] * p.grad.sign())


def _vae_pair():
    return lvmkit.build_vae(lvmkit.VAEConfig(data_dim=6, latent_dim=2, hidden_dims=(8,)))


def test_an_optimizer_without_a_rate_trains_and_reports_none():
    model, guide = _vae_pair()
    x = torch.bernoulli(torch.full((64, 6), 0.3))
    result = lvmkit.fit(
        model, guide, x, epochs=3, batch_size=16, optimizer=_SignDescent, progress=False
    )
    assert result.history.lr.isna().all() and result.history.train_loss.notna().all()
    assert result.history.train_loss.iloc[-1] < result.history.train_loss.iloc[0]


# -- per-point parameters (examples/sparse_gamma_def.py) ------------------------------------------

LATENT, WIDTH = 2, 5


def gamma_model(x):
    """A one-layer sparse-gamma-style model: global Gamma weights, Gamma codes per point."""
    w = pyro.sample("w", dist.Gamma(1.0, 1.0).expand([LATENT, WIDTH]).to_event(2))  # (K, D)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Gamma(1.0, 1.0).expand([LATENT]).to_event(1))  # batch (N,) (K,)
        rate = (z.unsqueeze(-1) * w).sum(-2) + 1e-3  # z @ w, with batch dims
        pyro.sample("obs", dist.Poisson(rate).to_event(1), obs=x)  # event (D,)


def gamma_guide(x):
    """One pyro.param row per data point, as sparse_gamma_def's guide holds them: shape (N, K),
    made for the whole data and used unindexed inside the plate."""
    n = x.shape[0]
    w_loc = pyro.param(
        "w_loc", lambda: torch.ones(LATENT, WIDTH), constraint=dist.constraints.positive
    )
    pyro.sample("w", dist.Delta(w_loc, event_dim=2))
    alpha = pyro.param("alpha", lambda: torch.ones(n, LATENT), constraint=dist.constraints.positive)
    beta = pyro.param("beta", lambda: torch.ones(n, LATENT), constraint=dist.constraints.positive)
    with pyro.plate("data", n):
        pyro.sample("z", dist.Gamma(alpha, beta).to_event(1))  # batch (N,) event (K,)


def test_a_guide_with_a_parameter_row_per_point_is_scored_per_point():
    """Chunks of points cannot index such a guide (it ended in Pyro's "Shape mismatch inside
    plate('data')"): it is scored on its whole data, each point's weight from its own row, and
    the points' ELBOs add up to Pyro's own ELBO estimate of the pair."""
    torch.manual_seed(0)
    x = torch.poisson(torch.full((12, WIDTH), 2.0))
    lvmkit.fit(
        gamma_model, gamma_guide, x, epochs=30, batch_size=None, progress=False,
        optimizer=pyro.optim.AdagradRMSProp({"eta": 0.1}),
    )  # fmt: skip
    scores = lvmkit.evaluate(gamma_model, gamma_guide, x, num_samples=1000)
    assert len(scores) == 12 and scores.log_likelihood.notna().all()
    assert (scores.log_likelihood >= scores.elbo - 1e-6).all()
    w_hat = pyro.param("w_loc").detach()
    prior_w = dist.Gamma(1.0, 1.0).expand([LATENT, WIDTH]).to_event(2).log_prob(w_hat)
    pyros = -pyro.infer.Trace_ELBO(num_particles=4000, vectorize_particles=True).loss(
        gamma_model, gamma_guide, x
    )
    assert float(scores.elbo.sum() + prior_w) == pytest.approx(pyros, abs=0.5)


# -- points along another dimension (examples/lda.py) ---------------------------------------------

TOPICS, WORDS, PER_DOC, DOCS = 3, 6, 5, 8


def lda_model(data=None):
    """Pyro's LDA layout: data (words per document, documents), the shape asserted."""
    with pyro.plate("topics", TOPICS):
        topic_weights = pyro.sample("topic_weights", dist.Gamma(1.0 / TOPICS, 1.0))
        topic_words = pyro.sample(
            "topic_words", dist.Dirichlet(torch.ones(WORDS) / WORDS)
        )  # batch (T,) event (W,)
    with pyro.plate("documents", DOCS) as ind:
        if data is not None:
            assert data.shape == (PER_DOC, DOCS)
            data = data[:, ind]
        doc_topics = pyro.sample("doc_topics", dist.Dirichlet(topic_weights))  # (D,) (T,)
        with pyro.plate("words", PER_DOC):
            word_topics = pyro.sample(
                "word_topics", dist.Categorical(doc_topics), infer={"enumerate": "parallel"}
            )  # batch (P, D)
            pyro.sample("doc_words", dist.Categorical(topic_words[word_topics]), obs=data)


def lda_guide(data=None):
    """Point masses throughout: the per-document topics from a network of each document's
    word counts (Pyro's amortised predictor), the globals as parameters."""
    weights = pyro.param(
        "weights_q", lambda: torch.ones(TOPICS), constraint=dist.constraints.positive
    )
    words = pyro.param(
        "words_q",
        lambda: torch.full((TOPICS, WORDS), 1.0 / WORDS),
        constraint=dist.constraints.simplex,
    )
    with pyro.plate("topics", TOPICS):
        pyro.sample("topic_weights", dist.Delta(weights))
        pyro.sample("topic_words", dist.Delta(words, event_dim=1))
    pyro.module("predictor", PREDICTOR)
    with pyro.plate("documents", DOCS) as ind:
        picked = data[:, ind]
        counts = torch.zeros(WORDS, len(ind)).scatter_add(0, picked, torch.ones(picked.shape))
        topics = torch.softmax(PREDICTOR(counts.T), dim=-1)  # (D, T)
        pyro.sample("doc_topics", dist.Delta(topics, event_dim=1))


PREDICTOR = torch.nn.Linear(WORDS, TOPICS)


def test_data_laid_out_along_another_dimension_are_scored_per_document():
    """(words, documents) data with the shape asserted in the model: evaluate cut the first
    dimension (words), the model's assert failed, and lvmkit's own error handler crashed on
    the empty message. Now the pair gets its whole data with the documents plate's indices set
    per chunk: one row per document, each the exact sum over its words' topics."""
    torch.manual_seed(0)
    data = torch.randint(WORDS, (PER_DOC, DOCS))
    elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=2)
    lvmkit.fit(
        lda_model, lda_guide, data, epochs=5, batch_size=None, objective=elbo, lr=0.05,
        progress=False,
    )  # fmt: skip
    scores = lvmkit.evaluate(lda_model, lda_guide, data, num_samples=3, max_pairs=6)
    assert len(scores) == DOCS
    with torch.no_grad():
        weights, words = pyro.param("weights_q"), pyro.param("words_q")
        counts = torch.zeros(WORDS, DOCS).scatter_add(0, data, torch.ones(data.shape))
        topics = torch.softmax(PREDICTOR(counts.T), dim=-1)  # (D, T)
        per_word = torch.logsumexp(topics.log()[None] + words.log().T[data], dim=-1)  # (P, D)
        exact = per_word.sum(0) + dist.Dirichlet(weights).log_prob(topics)
    assert_close(scores.log_likelihood.to_numpy().copy(), exact.numpy(), atol=1e-4)


def test_a_bare_assert_that_nothing_rescues_gets_lvmkits_error():
    def model(x):
        assert x.shape[1] == 99
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(0.0, 1.0).expand([3]).to_event(1), obs=x)

    def guide(x):
        pass

    where = r"AssertionError in model\(\) at .*test_pyro_example_patterns.py"
    with pytest.raises(ValueError, match=where):
        lvmkit.evaluate(model, guide, torch.zeros(4, 3), num_samples=2)


# -- exact resume whatever the load ---------------------------------------------------------------

_LIFE = """
import os, signal, sys
import pyro, pyro.distributions as dist, torch
import lvmkit

run_dir, threads, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
threads = threads if threads == "auto" else int(threads)
torch.manual_seed(0)
x = torch.randn(48, 20_000)
loc = torch.nn.Parameter(torch.zeros(20_000))

def model(x):
    pyro.module("loc", torch.nn.ParameterList([loc]))
    with pyro.plate("data", x.shape[0], dim=-2):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))  # batch (N, 1)
        with pyro.plate("pixels", x.shape[1], dim=-1):
            pyro.sample("x", dist.Normal(loc + z, 1.0), obs=x)  # batch (N, D)

def guide(x):
    m = pyro.param("m", torch.zeros(()))
    with pyro.plate("data", x.shape[0], dim=-2):
        pyro.sample("z", dist.Normal(m, 1.0))

class Kill(lvmkit.Callback):
    seen = 0
    def on_checkpoint(self, path, epoch, step):
        print(f"threads={torch.get_num_threads()}", flush=True)
        Kill.seen += 1
        if Kill.seen == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

resume = os.path.exists(os.path.join(run_dir, "checkpoint.pt"))
lvmkit.fit(model, guide, x, epochs=3, batch_size=24, lr=0.01, seed=0, run_dir=run_dir,
           resume=resume, checkpoint_every=1, threads=threads, progress=False,
           callbacks=[Kill()])
"""


def _life(tmp_path, run_dir, threads, kill_at=0, cpus=None):
    import os
    import subprocess
    import sys

    script = tmp_path / "life.py"
    script.write_text(_LIFE)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus is not None else None
    return subprocess.run(
        [sys.executable, str(script), str(run_dir), str(threads), str(kill_at)],
        env=env, preexec_fn=pin, capture_output=True, text=True,
    )  # fmt: skip


def _two_cpus():
    import os

    return len(os.sched_getaffinity(0)) >= 2


@pytest.mark.skipif(not _two_cpus(), reason="needs two CPUs to start on")
def test_a_resume_on_a_busier_machine_keeps_its_threads_and_its_bits(tmp_path):
    """Started with 2 threads, SIGKILLed mid-epoch, resumed where one CPU is free: threads='auto'
    used to decide afresh (1 thread), and torch's CPU kernels may split their sums by thread (a
    default-size MNIST run ended with 24 of its 34 checkpoint tensors different). The resume now
    keeps the count it started with, and ends bit for bit where an uninterrupted run ends."""
    import os
    import signal

    from lvmkit.inference.checkpoint import load_checkpoint

    run, straight = tmp_path / "run", tmp_path / "straight"
    killed = _life(tmp_path, run, 2, kill_at=3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    at = load_checkpoint(run / "checkpoint.pt")
    assert (at["epoch"], at["step"]) == (1, 1)  # mid-epoch 2
    one_cpu = {min(os.sched_getaffinity(0))}
    resumed = _life(tmp_path, run, "auto", cpus=one_cpu)
    assert resumed.returncode == 0, resumed.stderr
    assert "continues with the 2 CPU thread(s) it started with" in resumed.stderr
    assert set(resumed.stdout.split()) == {"threads=2"}  # (auto alone picks 1 on one free CPU)
    assert _life(tmp_path, straight, 2).returncode == 0
    ours, theirs = (load_checkpoint(d / "checkpoint.pt")["params"] for d in (run, straight))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_continued_evaluation_keeps_the_threads_it_started_with(tmp_path, monkeypatch, caplog):
    import importlib

    from conftest import interrupted_scoring
    from linear_gaussian import LinearGaussianGuide, make_problem

    threads_module = importlib.import_module("lvmkit.inference.threads")
    model, x = make_problem(n=90)
    guide = LinearGaussianGuide(5, 2)
    path = tmp_path / "partial.pt"
    with interrupted_scoring(monkeypatch, block=1200, at=3), pytest.raises(KeyboardInterrupt):
        lvmkit.evaluate(model, guide, x, 40, max_pairs=400, checkpoint=path, threads=2)
    assert lvmkit.inference.checkpoint.load_checkpoint(path)["threads"] == 2
    monkeypatch.setattr(threads_module, "usable_cpus", lambda: 1)  # one CPU free now
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # (nothing set by the user either)
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads_module, "_AT_IMPORT", torch.get_num_threads())
    seen = []
    real = threads_module.choose
    monkeypatch.setattr(threads_module, "choose", lambda t: seen.append(t) or real(t))
    with caplog.at_level("WARNING", logger="lvmkit"):
        resumed = lvmkit.evaluate(model, guide, x, 40, max_pairs=400, checkpoint=path)
    assert seen == [2]  # not "auto", which would give 1 here
    assert any("continues with the 2 CPU thread(s)" in r.getMessage() for r in caplog.records)
    straight = lvmkit.evaluate(model, guide, x, 40, max_pairs=400, threads=2)
    import pandas as pd

    pd.testing.assert_frame_equal(resumed, straight)
